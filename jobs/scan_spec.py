"""The scan spec: what one scheduled audit reads, runs and writes, as one validated YAML file.

A scan is what fbmem's users schedule (every week, every checkpoint, every new batch of shards):
audit one model against one corpus and see what changed. The spec names the corpus sources, the
model, the prompt sets, the settings that differ from a preset, the stages to run and where the
outputs go; `fbmem scan SPEC --db DB` runs it (jobs/scan.py). Like the config, unknown keys are
errors (a misspelt stage or threshold must not silently run the defaults), and relative paths
are relative to the spec file, so a spec and its data can move together (a ConfigMap mount, a
repo checkout).

Settings layers, lowest first: the defaults, `preset`, `config` (a YAML file), `settings` (dotted
keys), then the spec's own fields (`model`, `samples`, `thresholds`, `resources`): every setting a
scan ran with is in its `runs` rows, as for any job.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from fbmem.jobs.config import Config, ConfigError, _Strict, dotted_leaves, load_config, preset_dict
from fbmem.storage.keys import stable_hash

# The stages in the order a scan runs them; `stages:` picks a subset, never another order.
STAGES = ("ingest", "index", "prompts", "cluster", "generate", "label", "nemo", "detect", "mitigate", "report")
Stage = Literal["ingest", "index", "prompts", "cluster", "generate", "label", "nemo", "detect", "mitigate", "report"]
SourceKind = Literal["auto", "folder", "manifest", "webdataset"]
# the prompts that are not memorized, for NeMo's activation statistics (SPEC 6)
ORDINARY_PROMPTS = "mem_type IS NULL AND (planted IS NULL OR planted = 'NM')"
_THRESHOLDS = ("tau", "tau_full", "tau_fg", "tau_bg", "beta")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SourceSpec(_Strict):
    """One corpus source: a folder, a CSV/Parquet manifest, or webdataset shards (a glob), local or
    on an object store (s3://...)."""

    uri: str
    kind: SourceKind = "auto"
    masks: Literal["eager", "lazy"] | None = None  # None: ingest.masks (lazy by default)


class PromptSetSpec(_Strict):
    """A prompt set: a file (a ';'-separated reference set or a CSV with a `prompt` column) or a
    shipped set by name (memorized-laion, ordinary-laion)."""

    set: str


class ClusterSpec(_Strict):
    where: str | None = None  # which prompts NeMo-C clusters (default: all)


class NemoSpec(_Strict):
    stats_prompts: str = ORDINARY_PROMPTS  # the ordinary prompts NeMo's statistics come from
    stats_from: str | None = None  # or a statistics file / shipped name (sd14) instead
    localize: Literal["memorized", "all"] = "memorized"


class DetectSpec(_Strict):
    methods: list[Literal["nemo", "wen"]] = ["nemo", "wen"]


class MitigationSpec(_Strict):
    methods: list[Literal["nemo", "nemo-c"]] = ["nemo", "nemo-c"]
    alphas: list[float] = [0.0]  # deactivation scale per run: 0 = off, 0 < a < 1 dampening

    @field_validator("alphas")
    @classmethod
    def _alpha_range(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 <= a < 1 for a in value):
            raise ValueError("alphas must be a non-empty list of values in [0, 1)")
        return value


class OutputsSpec(_Strict):
    report: str | None = "report"  # a folder (relative to the spec); null: no HTML report
    summary_json: str | None = None  # the scan's figures for CI or a dashboard


class ScanSpec(_Strict):
    """One scan, field by field (README, "Scheduled scans")."""

    name: str  # the schedule's name: scans of one spec share it, and a rerun resumes its last
    preset: str | list[str] | None = None  # a preset, or presets laid one over the other (tiny, demo)
    config: str | None = None  # a config YAML file, relative to the spec
    settings: dict[str, Any] = {}  # dotted config keys, e.g. {"candidates.k": 10}
    model: str | None = None  # the audited diffusion model: hub id or local folder (models.diffusion.model)
    sources: list[SourceSpec] = []
    prompts: list[PromptSetSpec] = []
    samples: int | None = Field(None, ge=1)  # generations per prompt (generation.n)
    thresholds: dict[str, float] = {}  # tau, tau_full, tau_fg, tau_bg, beta (fbmem.*)
    stages: list[Stage] = list(STAGES)
    label_where: str = "mitigation = 'none'"  # the audited generations (mitigated ones label in `mitigate`)
    cluster: ClusterSpec = ClusterSpec()
    nemo: NemoSpec = NemoSpec()
    detect: DetectSpec = DetectSpec()
    mitigation: MitigationSpec = MitigationSpec()
    resources: dict[str, Any] = {}  # resources.* (actors, GPUs, ray_address)
    gates: list[str] = []  # like --fail-on, e.g. "VM > 0.01"
    outputs: OutputsSpec = OutputsSpec()
    base_dir: str = Field("", exclude=True)  # the spec file's folder: where relative paths start

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("name: letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit")
        return value

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(_THRESHOLDS))
        if unknown:
            raise ValueError(f"unknown thresholds {unknown}; known: {', '.join(_THRESHOLDS)}")
        return value

    @field_validator("stages")
    @classmethod
    def _in_order(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("stages: a stage is named twice")
        return [s for s in STAGES if s in value]

    @model_validator(mode="after")
    def _inputs_for_stages(self) -> "ScanSpec":
        if "ingest" in self.stages and not self.sources:
            raise ValueError("the ingest stage needs `sources` (or leave `ingest` out of `stages`)")
        if "prompts" in self.stages and not self.prompts:
            raise ValueError("the prompts stage needs `prompts` (or leave `prompts` out of `stages`)")
        return self

    # ------------------------------------------------------------------ derived
    def path(self, value: str) -> str:
        """A path of the spec, relative to the spec file; URIs and absolute paths as they are."""
        if "://" in value or Path(value).is_absolute() or not self.base_dir:
            return value
        return str(Path(self.base_dir) / value)

    def model_ref(self) -> str | None:
        """The model as given: a local folder relative to the spec if one is there, else a hub id."""
        if self.model is None:
            return None
        local = self.path(self.model)
        return local if Path(local).exists() else self.model

    def prompt_set(self, p: PromptSetSpec) -> str:
        """A prompt file relative to the spec if it is there, else the name (a shipped set)."""
        local = self.path(p.set)
        return local if Path(local).exists() else p.set

    def overrides(self) -> dict[str, Any]:
        out = dict(self.settings)
        if self.model is not None:
            out["models.diffusion.model"] = self.model_ref()
        if self.samples is not None:
            out["generation.n"] = self.samples
        out.update({f"fbmem.{k}": v for k, v in self.thresholds.items()})
        out.update(dotted_leaves(self.resources, "resources."))
        return out

    def to_config(self, extra: dict[str, Any] | None = None) -> Config:
        """The scan's settings (module docstring's layers), then `extra` (the command's --set)."""
        presets = [self.preset] if isinstance(self.preset, str) else list(self.preset or [])
        layers: dict[str, Any] = {}
        for name in presets[1:]:  # the first is the base preset; later ones are layers over it
            layers.update(dotted_leaves(preset_dict(name)))
        overrides = {**layers, **self.overrides(), **(extra or {})}
        return load_config(preset=presets[0] if presets else None,
                           path=self.path(self.config) if self.config else None, overrides=overrides)

    def record(self) -> dict[str, Any]:
        """The spec as stored in `scans` (paths resolved, so the row says what was read)."""
        data = self.model_dump(mode="json")
        data["sources"] = [{**s, "uri": self.path(s["uri"])} for s in data["sources"]]
        data["prompts"] = [{"set": self.prompt_set(p)} for p in self.prompts]
        if self.model is not None:
            data["model"] = self.model_ref()
        return data

    def spec_hash(self) -> str:
        return stable_hash(json.dumps(self.record(), sort_keys=True))


def load_scan_spec(path: str | Path) -> ScanSpec:
    """Read and validate a spec file; errors name the file and the field (ConfigError: exit 1).
    The settings it implies are validated too, so a bad threshold fails before any work."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"scan spec {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"scan spec {p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"scan spec {p}: expected a mapping of fields, got {type(data).__name__}")
    try:
        spec = ScanSpec.model_validate({**data, "base_dir": str(p.resolve().parent)})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"scan spec {p}: {problems}") from None
    try:
        spec.to_config()
    except ConfigError as exc:
        raise ConfigError(f"scan spec {p}: its settings: {exc}") from None
    return spec
