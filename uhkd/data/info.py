"""What the training loop needs to know about a dataset (`DatasetInfo`), and how a dataset whose classes and
statistics depend on its files (`folder`, timm's factory names) is resolved for one root."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int  # 0 until `resolve` has read the files
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    in_memory: bool  # small uint8 arrays: eligible for the on-device batch path
    eval_crop_pct: float  # evaluation: resize to img_size / crop_pct, centre crop img_size
    load: Callable[[str, bool, bool], Any]  # (root, train, download) -> map-style dataset of (PIL image, label)
    check: Callable[[str, bool], None]  # (root, download): cheap presence check, UserError if missing
    resolve: Callable[[str], "DatasetInfo"] | None = None  # root -> this info with classes and statistics filled in
    found: str = ""  # what `resolve` read at the root: classes and images per split
    stats_from: str = ""  # where the mean/std of a resolved dataset come from

    def at(self, root: str, mean: str = "", std: str = "") -> "DatasetInfo":
        """This dataset's info for the files at `root`; `mean`/`std` (comma lists) replace its statistics."""
        info = self.resolve(root) if self.resolve is not None else self
        given = {k: _triple(k, v) for k, v in (("mean", mean), ("std", std)) if v}
        if not given:
            return info
        named = " and ".join(f"data.{k}" for k in given)
        origin = f"given by {named}" + ("" if len(given) == 2 or not info.stats_from else f"; {info.stats_from}")
        return dataclasses.replace(info, **given, stats_from=origin)

    def summary(self) -> str:
        """One line on what a dataset read from its files holds and the normalisation used ("" for the others)."""
        if not self.found:
            return ""
        return (f"dataset {self.name}: {self.found}; mean {_numbers(self.mean)} std {_numbers(self.std)} "
                f"({self.stats_from})")


def _numbers(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def _triple(key: str, text: str) -> tuple[float, float, float]:
    from ..errors import UserError

    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or (key == "std" and min(values) <= 0):
        raise UserError(f"data.{key} must be one or three comma-separated numbers{' > 0' if key == 'std' else ''} "
                        f"(R,G,B in [0, 1] units), got {text!r}")
    return values  # type: ignore[return-value]
