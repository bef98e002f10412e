"""The experiment spec: one YAML file, validated with pydantic, fully resolved before a run.

Registry sections (``data``, ``model``, ``loss``, ``optimizer``) are ``{kind: name, ...params}``
mappings checked against the registered parameter model, then stored with every default filled
in, so a run directory's ``spec.yaml`` says exactly what ran.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data import DATASETS
from .errors import SpecError, format_validation_error
from .groups import load_group_spec
from .loss import LOSSES
from .models import MODELS
from .optimizer import OPTIMIZERS
from .probes import PROBES
from .store import RunStore
from .yaml_file import read_yaml

__all__ = ["MAX_STEPS", "CheckpointSpec", "MeasureSpec", "Spec", "load_spec", "parse_spec", "read_yaml"]

MAX_STEPS = 100_000_000  # a sane bound on a run's length (issue 17); far above any study's needs


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class MeasureSpec(_Section):
    """When to measure: every k steps, plus dense windows ``[start, stop, every]``."""

    every: Optional[int] = Field(32, gt=0)
    windows: list[tuple[int, int, int]] = Field(default_factory=list)
    warmup: int = Field(50, ge=0, description="t* is the first measurement after this step with S >= threshold")
    sharpness: bool = True
    top_k: int = Field(1, ge=1, le=64)
    tol: float = Field(1e-3, gt=0, lt=1)
    max_matvecs: int = Field(500, gt=0)
    subset: Optional[int] = Field(None, gt=0, description="size of a fixed, seeded subset for curvature")
    chunk_size: Optional[int] = Field(None, gt=0)
    probes: bool = Field(True, description="per-group probes (needs groups)")
    alignment: bool = Field(True, description="per-example cos2(grad l_i, v1) and its Spearman rho with centroid distance")
    curvature_fraction: bool = True
    mechanism: bool = Field(True, description="oscillation_variance, v1_group_curvature, oscillation_cost and "
                                              "drift_rate (eosbranch.mechanism; needs groups for the per-group terms)")
    examples: Literal["all", "groups", "off"] = Field("groups", description="rows of examples.parquet")
    group_loss_every: Optional[int] = Field(
        None, gt=0, description="minibatch runs: full-data group losses every k steps (default: at measurements); "
                                "full-batch runs record them at every step")
    oscillation_window: int = Field(
        8, ge=2, le=1024, description="steps before a measurement over which the oscillation variance along v1 is taken")
    reference: Optional[int] = Field(
        None, ge=0, description="step of theta_ref, v1_ref for weight_projection (a measurement step; default t*)")
    extra_probes: list[Any] = Field(
        default_factory=list,
        description="probes registered in eosbranch.probes.PROBES, run at each measurement: names or {kind: name, ...}")

    @field_validator("examples", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        # YAML 1.1 reads an unquoted `off` as false: take it as the word the user wrote.
        return "off" if v is False else v

    @field_validator("windows")
    @classmethod
    def _windows(cls, v):
        for start, stop, every in v:
            if not (0 <= start < stop and every > 0):
                raise ValueError(f"window [{start}, {stop}, {every}] needs 0 <= start < stop and every > 0")
        return v

    def due(self, step: int) -> bool:
        if self.every and step % self.every == 0:
            return True
        return any(a <= step < b and (step - a) % e == 0 for a, b, e in self.windows)


class CheckpointSpec(_Section):
    """Checkpoints every k steps and at listed steps; step 0 and the last step are always saved."""

    every: Optional[int] = Field(100, gt=0)
    at: list[int] = Field(default_factory=list)

    @field_validator("at")
    @classmethod
    def _nonneg(cls, v):
        if any(s < 0 for s in v):
            raise ValueError("checkpoint steps must be >= 0")
        return sorted(set(v))

    def due(self, step: int, last: int) -> bool:
        return step == 0 or step == last or step in self.at or bool(self.every and step % self.every == 0)


class Spec(_Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = Field(0, ge=0, lt=2**32)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    data: dict[str, Any]
    groups: Union[None, str, dict[str, Any], list[Any]] = None
    model: dict[str, Any]
    loss: Union[str, dict[str, Any]] = "mse"
    optimizer: dict[str, Any]
    steps: int = Field(ge=0, le=MAX_STEPS)  # 10**12 would run "forever": refused in one line
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)

    @model_validator(mode="before")
    @classmethod
    def _kind_strings(cls, v):
        # `data: digits` is shorthand for `data: {kind: digits}`.
        if isinstance(v, dict):
            for key in ("data", "model", "optimizer"):
                if isinstance(v.get(key), str):
                    v = {**v, key: {"kind": v[key]}}
        return v

    def digest(self) -> str:
        """Short hash of everything but ``steps``: a run extended to more steps keeps its name."""
        body = self.model_dump(mode="json", exclude={"steps"})
        if not body["measure"]["extra_probes"]:  # a field added later: names of runs without it stay
            del body["measure"]["extra_probes"]
        for key, default in _LATER_MEASURE_DEFAULTS.items():  # likewise, at their defaults
            if body["measure"].get(key) == default:
                del body["measure"][key]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Measure fields added after runs were named: at these values a spec keeps its old digest.
_LATER_MEASURE_DEFAULTS = {"group_loss_every": None, "oscillation_window": 8, "mechanism": True}


def _resolve_sections(spec: Spec, source: str) -> Spec:
    """Check each registry section and fill in its defaults."""
    resolved = {}
    for key, registry in (("data", DATASETS), ("model", MODELS), ("loss", LOSSES), ("optimizer", OPTIMIZERS)):
        entry, params = registry.parse(getattr(spec, key), key, source)
        resolved[key] = {"kind": entry.name, **params.model_dump(mode="json")}
    if spec.measure.extra_probes:
        resolved["measure"] = spec.measure.model_copy(update={"extra_probes": _resolve_probes(spec.measure, source)})
    if spec.groups is not None:
        # A catalog name is expanded into its entries, so spec.yaml records exactly what ran.
        resolved["groups"] = load_group_spec(spec.groups, source)
    return spec.model_copy(update=resolved)


def _resolve_probes(measure: MeasureSpec, source: str) -> list[dict]:
    out = []
    for i, section in enumerate(measure.extra_probes):
        where = f"measure.extra_probes[{i}]"
        entry, params = PROBES.parse(section, where, source)
        if entry.name == "groups":  # it already runs under measure.probes: rows would be doubled
            raise SpecError(f"{source}: {where}: 'groups' runs already (measure.probes: true); list other probes here")
        if any(p["kind"] == entry.name for p in out):
            raise SpecError(f"{source}: {where}: probe {entry.name!r} is listed twice")
        out.append({"kind": entry.name, **params.model_dump(mode="json")})
    return out


def parse_spec(raw: Any, source: str = "<spec>") -> Spec:
    """Validate a spec mapping; any problem raises a one-line :class:`SpecError`."""
    if isinstance(raw, Spec):
        return raw
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping of spec sections, got {type(raw).__name__}")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source, model=Spec)) from None
    return _resolve_sections(spec, source)


def load_spec(path: Union[str, Path], **overrides) -> Spec:
    """Read, override (e.g. ``steps``, ``seed``) and validate a spec file (a run's own spec.yaml
    is first checked against the run's record: store.RunStore.verified_bytes)."""
    path = Path(path)
    if path.name == "spec.yaml" and (path.parent / "record.json").exists():
        RunStore(path.parent).verified_bytes(path.name)
    raw = read_yaml(path)
    if isinstance(raw, dict):
        raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_spec(raw, str(path))
