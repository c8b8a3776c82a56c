"""The one validated config object.

Every threshold, model reference and resource setting lives here, with the reference defaults
of SPEC.md, so a run's behaviour is fully described by one object that is stored in `runs`.
Layers, lowest to highest priority: these defaults, a named preset (`jobs/presets/NAME.yaml`), a
user YAML file, then explicit overrides (CLI flags). Unknown keys are errors, not silently ignored,
because a misspelt threshold would otherwise run a scan with the default.
"""
from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClipConfig(_Strict):
    """open_clip model by name + pretrained tag (hub or local checkpoint file), or `tiny`."""

    model_name: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    tiny: bool = False  # random-weight tiny model built from a custom config (tests, offline demo)
    seed: int = 0  # seeds the random init of tiny models so every actor holds the same weights

    @property
    def model_id(self) -> str:
        if self.tiny:
            return f"open_clip:tiny-random:seed{self.seed}"
        return f"open_clip:{self.model_name}:{self.pretrained}"


class SegmenterConfig(_Strict):
    """Foreground segmentation: SAM (default, needs a checkpoint) or a weight-free fallback."""

    backend: Literal["sam", "grabcut", "colour"] = "sam"
    sam_model_type: Literal["vit_h", "vit_l", "vit_b", "tiny"] = "vit_h"
    sam_checkpoint: str | None = None  # local .pth (loaded weights_only) or .safetensors
    seed: int = 0
    points_per_side: int = 32
    pred_iou_thresh: float = Field(0.88, ge=0, le=1)
    stability_score_thresh: float = Field(0.95, ge=0, le=1)
    # foreground choice from SAM's masks (see pipelines/sam_segmenter.py)
    min_area_frac: float = Field(0.005, ge=0, le=1)
    max_area_frac: float = Field(0.9, gt=0, le=1)
    border_touch_frac: float = Field(0.05, ge=0, le=1)
    max_side: int = Field(1024, ge=64)  # images are downscaled to this side before segmenting
    # "colour" backend (pipelines/colour_segmenter.py; also uses min_area_frac, border_touch_frac)
    colour_clusters: int = Field(4, ge=2, le=16)  # k-means colour clusters per image
    colour_refine: bool = True  # GrabCut refinement of the cluster mask's edge

    @property
    def model_id(self) -> str:
        if self.backend == "colour":  # its settings change the masks: they are part of the id
            return f"colour:k{self.colour_clusters}{'' if self.colour_refine else ':no-refine'}"
        if self.backend != "sam":
            return f"{self.backend}"
        if self.sam_model_type == "tiny":
            return f"sam:tiny-random:seed{self.seed}"
        return f"sam:{self.sam_model_type}:{Path(self.sam_checkpoint).name if self.sam_checkpoint else 'none'}"


class DiffusionConfig(_Strict):
    """The audited text-to-image model: a diffusers pipeline by hub id or local folder, or `tiny`."""

    model: str = "CompVis/stable-diffusion-v1-4"
    tiny: bool = False
    seed: int = 0
    revision: str | None = None

    @property
    def model_id(self) -> str:
        return f"diffusers:tiny-random:seed{self.seed}" if self.tiny else f"diffusers:{self.model}"


class ModelsConfig(_Strict):
    clip: ClipConfig = ClipConfig()
    segmenter: SegmenterConfig = SegmenterConfig()
    diffusion: DiffusionConfig = DiffusionConfig()


class ActorResources(_Strict):
    """Ray resources of one actor pool. Fractional CPUs let small machines run several stages."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    pool_size: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    # Ray custom resources per actor, e.g. {"model_worker": 1}: the pool then runs only on nodes
    # started with that resource (`ray start --resources='{"model_worker": 4}'`).
    custom: dict[str, float] = {}

    @model_validator(mode="after")
    def _check_custom(self) -> "ActorResources":
        bad = sorted(k for k, v in self.custom.items() if k in ("CPU", "GPU", "memory") or v < 0)
        if bad:
            raise ValueError(f"custom resources {bad}: amounts must be >= 0, and CPU/GPU are num_cpus/num_gpus")
        return self


class ResourcesConfig(_Strict):
    ray_address: str | None = None  # None: start (or join) a local Ray
    ray_num_cpus: int | None = None  # local Ray only
    decode_num_cpus: float = Field(0.25, gt=0)
    embed: ActorResources = ActorResources()
    segment: ActorResources = ActorResources(batch_size=4)
    generate: ActorResources = ActorResources(batch_size=4)
    score: ActorResources = ActorResources(batch_size=64)
    # NeMo's model (UNet + text encoder): statistics, detection, localization (jobs/model_actors.py).
    # batch_size: prompts per actor call in detection and localization (statistics: 64 per call).
    nemo: ActorResources = ActorResources(batch_size=1)
    # clustering's text encoder (cluster.embedding=text_encoder); batch_size: prompts per encoder batch
    cluster: ActorResources = ActorResources(batch_size=64)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class IngestConfig(_Strict):
    """Reading and validating images (pipelines/fetch.py, pipelines/images.py)."""

    # --- decode: all checked from the header, before any pixel is decoded
    max_pixels: int = Field(89_478_485, ge=1)  # PIL's own decompression-bomb limit by default
    min_side: int = Field(32, ge=1)
    max_side: int = Field(16_384, ge=1)  # longest side (WebP's own limit; wider than any camera)
    max_aspect_ratio: float = Field(20.0, ge=1)  # longer side / shorter side
    # larger images are validated decoded reduced (JPEG at 1/2..1/8 scale; others reduced before
    # mode conversion); width/height stay the full size
    decode_max_pixels: int = Field(4_194_304, ge=1)
    masks: Literal["eager", "lazy"] = "lazy"
    store_image_bytes: bool = True
    write_batch_rows: int = Field(512, ge=1)
    # --- fetch: each URI of a validate batch, concurrently
    fetch_threads: int = Field(16, ge=1)  # threads per validate task
    fetch_connect_timeout_s: float = Field(10.0, gt=0)
    http_timeout_s: float = Field(30.0, gt=0)  # a read that gets no byte for this long fails
    fetch_deadline_s: float = Field(60.0, gt=0)  # the whole fetch of one file, retries included
    fetch_max_bytes: int = Field(32 * 2**20, ge=1)  # a larger file is an error row, never read whole
    fetch_retries: int = Field(2, ge=0)  # retries of transient failures (reset, 5xx, 429, connect timeout)
    fetch_backoff_s: float = Field(0.5, ge=0)  # first retry's wait; doubles each retry, +-50% jitter


class EngineConfig(_Strict):
    """The ingest engine at corpus scale (DESIGN.md, "Running at corpus scale"; jobs/ingest.py).

    A source is cut into shards; workers write Lance fragments and the driver commits their
    metadata in batches; a ledger of finished shards lets a rerun skip them unread.
    """

    # --- shards: the unit of work, of skipping and of redoing after a crash
    folder_files_per_shard: int = Field(1000, ge=1)  # a folder: its sorted image list in chunks
    manifest_rows_per_shard: int = Field(10_000, ge=1)  # a CSV/Parquet manifest: row ranges
    shards_per_execution: int = Field(1000, ge=1)  # shards per Ray Data execution (bounds the plan)
    # --- stages on the workers
    check_batch_rows: int = Field(256, ge=1)  # keys per check against the stored table
    rows_per_fragment: int = Field(2048, ge=1)  # rows per written Lance fragment (per write task)
    write_num_cpus: float = Field(0.25, ge=0)  # key check, fragment writer and maintenance tasks
    # --- commits on the driver: one Append per this many fragments, or per this many seconds
    commit_every_fragments: int = Field(16, ge=1)
    commit_every_s: float = Field(60.0, gt=0)
    # --- maintenance: compaction and the key index, every N commits during a job and at its end
    maintain_every_commits: int = Field(64, ge=1)
    compact_target_rows: int = Field(1_048_576, ge=1)  # rows per fragment after compaction
    compact_min_fragments: int = Field(8, ge=2)  # a job that wrote nothing compacts above this only
    distributed_compaction_rows: int = Field(4_000_000, ge=0)  # above: lance-ray, one task per group
    compaction_workers: int = Field(4, ge=1)
    key_index_min_rows: int = Field(1_000_000, ge=0)  # BTREE on the key from this many rows
    version_retention_s: float = Field(86_400.0, ge=0)  # older versions are removed at the end


class FBMemConfig(_Strict):
    """SPEC.md sections 1-2."""

    image_size: int = Field(512, ge=8)  # S
    region_metric: Literal["region", "masked-view"] = "region"
    tau: float = Field(0.8, ge=0, le=1)
    tau_full: float | None = Field(None, ge=0, le=1)
    tau_fg: float | None = Field(None, ge=0, le=1)
    tau_bg: float | None = Field(None, ge=0, le=1)
    beta: float = Field(0.03, ge=0, lt=0.5)
    win_size: int = Field(11, ge=3)
    win_sigma: float = Field(1.5, gt=0)
    ms_weights: list[float] = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    small_images: Literal["upsample", "reject"] = "upsample"
    chunk_pairs: int = Field(16, ge=1)  # pairs per batched scorer call (bounds memory)
    # Pixels (at S) along each region's edge left out of it (`region` metric): windows there reach
    # across into pixels where the views differ because the masks do (region_similarity.
    # region_interior). 0 = SPEC section 1 as written; small blurry objects (the toy model's 64 px
    # samples) need ~2 px of their own size.
    edge_band: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _odd_window(self) -> "FBMemConfig":
        if self.win_size % 2 == 0:
            raise ValueError("fbmem.win_size must be odd")
        if not self.ms_weights:
            raise ValueError("fbmem.ms_weights must not be empty")
        return self

    @property
    def thresholds(self) -> tuple[float, float, float]:
        """(tau_full, tau_fg, tau_bg), each falling back to tau."""
        t = self.tau
        return (
            self.tau_full if self.tau_full is not None else t,
            self.tau_fg if self.tau_fg is not None else t,
            self.tau_bg if self.tau_bg is not None else t,
        )


class IndexConfig(_Strict):
    """Vector index on training embeddings (LanceDB)."""

    index_type: Literal["IVF_PQ", "IVF_HNSW_SQ", "IVF_FLAT"] = "IVF_PQ"
    metric: Literal["cosine", "dot", "l2"] = "cosine"
    num_partitions: int | None = None  # None: sqrt(rows)
    num_sub_vectors: int | None = None  # None: dim / 8 (IVF_PQ)
    nprobes: int = Field(32, ge=1)
    refine_factor: int | None = 10
    exact_below_rows: int = Field(10_000, ge=0)  # below this, search is brute force
    # An existing index is updated (new rows added to its partitions, Lance's optimize) while the
    # rows it does not cover stay under this share of the table; above it, it is rebuilt (new
    # partitions fitted to the grown corpus).
    max_unindexed_share: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _pq_needs_refine(self) -> "IndexConfig":
        # Without re-ranking on full vectors, IVF_PQ's recall@20 was ~0.47 at any nprobes in
        # bench/retrieval.py (200k x 512): PQ distances alone cannot order close candidates.
        if self.index_type == "IVF_PQ" and not self.refine_factor:
            raise ValueError("index.refine_factor must be >= 1 with IVF_PQ (recall collapses without it)")
        return self


class CandidatesConfig(_Strict):
    """SPEC.md section 3."""

    k: int = Field(20, ge=1)
    mode: Literal["ann", "exact"] = "ann"
    include_linked: bool = True


class GenerationConfig(_Strict):
    """SPEC.md section 9."""

    n: int = Field(5, ge=1)
    steps: int = Field(50, ge=1)
    guidance: float = Field(7.0, ge=0)
    size: int = Field(512, ge=8)
    scheduler: Literal["ddim"] = "ddim"
    dtype: Literal["auto", "float16", "float32", "bfloat16"] = "auto"
    base_seed: int = 0


class ClusterConfig(_Strict):
    """SPEC.md section 5."""

    k: int = Field(12, ge=2)
    max_iter: int = Field(500, ge=1)
    random_state: int = 1
    n_init: int = Field(10, ge=1)  # sklearn's default when the reference was written
    embedding: Literal["text_encoder", "open_clip"] = "text_encoder"


class NemoConfig(_Strict):
    """SPEC.md section 6."""

    n_latents: int = Field(10, ge=2)
    latent_seed: int = 1
    timestep_index: int = Field(1, ge=0)  # t_1: second timestep of the DDIM schedule
    schedule_steps: int = Field(50, ge=2)
    threshold: float = Field(0.428, ge=0, le=1)
    # MS-SSIM of noise differences: torchmetrics 1.3.2 with data_range=None (the reference's), or
    # the former pytorch-msssim-style score (data range 1, weights 1/n)
    detect_metric: Literal["torchmetrics", "pytorch-msssim"] = "torchmetrics"
    detect_beta: float = Field(0.33, gt=0)  # torchmetrics: every scale's exponent (ref betas (0.33,)*3)
    detect_win_size: int = Field(11, ge=3)  # torchmetrics: must be 11 (its window comes from sigma 1.5)
    detect_scales: int = Field(3, ge=1)
    detect_min_side: int = Field(0, ge=0)  # upsample noise differences to at least this side
    theta_start: float = 5.0
    theta_step: float = Field(0.25, gt=0)
    theta_min: float = 1.0
    # give up when, after the decrement, theta == theta_min (the reference's test) or theta <= theta_min
    theta_stop: Literal["equal", "at-or-below"] = "equal"
    k_start: int = Field(0, ge=0)
    k_max: int = Field(1280, ge=1)  # (ref) also give up when k reaches this
    refine_batch: int = Field(64, ge=1)  # candidate neuron sets per batched UNet call
    alpha: float = Field(0.0, ge=0, lt=1)
    # on a GPU: fp32 weights under fp16 autocast, fp32 x_T (the reference's; the model must be loaded
    # in float32), or the loaded weights' own dtype (pure fp16 with the default GPU load)
    gpu_numerics: Literal["autocast", "native"] = "autocast"


class RuntimeConfig(_Strict):
    """Liveness of long jobs and scans (jobs/runtime/heartbeat.py)."""

    heartbeat_s: float = Field(30.0, gt=0)  # a running job or scan writes its heartbeat this often
    # a `running` row whose heartbeat is older than this is `aborted` (its process is gone: killed,
    # its node lost); on the same host a dead process id says so at once
    stale_after_s: float = Field(300.0, gt=0)


class DetectConfig(_Strict):
    """`fbmem detect`: memorization detectors beside NeMo's (Wen et al., ICLR 2024)."""

    # Wen et al.'s score: || eps(x_t, c_p) - eps(x_t, c_empty) ||_2 averaged over the first
    # `wen_steps` sampling steps and `wen_seeds` seeds (guidance, schedule and size as in generation;
    # more steps than generation.steps means all of them). Defaults are the authors' (repository
    # YuxinWenRick/diffusion_memorization): detect_mem.py generates num_images_per_prompt=4 images
    # with num_inference_steps=50 from gen_seed=0 and records the L2 norm (lp=2) of
    # noise_pred_text - noise_pred_uncond per image and step; examples/det_mem_viz.ipynb scores a
    # prompt by the mean over steps 0..50 and num_gens=4. The paper (ICLR 2024, abstract) reports
    # high accuracy already at the first step with one generation: `wen_steps=1, wen_seeds=1` is
    # the cheap screen (2 UNet evaluations per prompt instead of 400).
    wen_steps: int = Field(50, ge=1)
    wen_seeds: int = Field(4, ge=1)
    # base of the per-prompt seeds (pipelines.generator.sample_seed(wen_seed, prompt_id, s)): equal to
    # generation.base_seed (0), seed s is generation's sample s, so the score describes those images
    wen_seed: int = 0
    prompt_batch: int = Field(8, ge=1)  # prompts per actor call (x wen_seeds x 2 rows per UNet call)


class QualityConfig(_Strict):
    """What mitigation costs in image quality (jobs/quality.py), before vs after images."""

    # clip_score: prompt-image cosine with the configured CLIP; fd_clip / kid_clip: Frechet distance
    # and KID between the before and after sets on CLIP image embeddings; other names are pyiqa
    # metrics (dbcnn, qalign, ...), run only when their weights are present locally
    metrics: list[str] = ["clip_score", "fd_clip", "kid_clip"]
    kid_subset_size: int = Field(50, ge=2)  # capped by the set size
    kid_subsets: int = Field(100, ge=1)
    seed: int = 0
    # the actor pool of the pyiqa metrics (they load a model; the CLIP metrics need none)
    resources: ActorResources = ActorResources(batch_size=16)


class Config(_Strict):
    """Everything a run needs. Stored as JSON in `runs` so any row can be traced to its settings."""

    models: ModelsConfig = ModelsConfig()
    resources: ResourcesConfig = ResourcesConfig()
    ingest: IngestConfig = IngestConfig()
    engine: EngineConfig = EngineConfig()
    fbmem: FBMemConfig = FBMemConfig()
    index: IndexConfig = IndexConfig()
    candidates: CandidatesConfig = CandidatesConfig()
    generation: GenerationConfig = GenerationConfig()
    cluster: ClusterConfig = ClusterConfig()
    nemo: NemoConfig = NemoConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    detect: DetectConfig = DetectConfig()
    quality: QualityConfig = QualityConfig()
    storage_options: dict[str, str] = {}  # object-store credentials etc., passed to LanceDB

    @field_validator("storage_options", mode="before")
    @classmethod
    def _options_as_strings(cls, value: Any) -> Any:
        """Lance takes every option as a string; YAML and `--set` give `true` and numbers."""
        if isinstance(value, dict):
            return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in value.items()}
        return value

    def to_json(self) -> str:
        """The whole config, credentials included: for the job's own actors, never for storage."""
        return self.model_dump_json()

    def to_record_json(self) -> str:
        """The config as the `runs` table keeps it: storage options that look like credentials
        (key, secret, token, password) are masked, so the database never holds its own keys."""
        data = self.model_dump(mode="json")
        data["storage_options"] = {
            k: ("***" if _SECRET_OPTION.search(k) else v) for k, v in data["storage_options"].items()
        }
        return json.dumps(data, sort_keys=True)


_SECRET_OPTION = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


class ConfigError(ValueError):
    """A config that cannot be used, with a message naming the file and the offending key."""


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping, got {type(data).__name__}")
    return data


def preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")]
        for p in resources.files("fbmem.jobs.presets").iterdir()
        if p.name.endswith(".yaml")
    )


def preset_dict(name: str) -> dict[str, Any]:
    path = resources.files("fbmem.jobs.presets") / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return _read_yaml(path.read_text(), f"preset {name}")


def dotted_leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings mapping as dotted keys of its leaves (`{"a": {"b": 1}}` -> `{"a.b": 1}`):
    a layer given as a tree (a preset, a spec's `resources`) applied as overrides."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(dotted_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict (used for CLI overrides)."""
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Defaults < preset < YAML file < overrides (dotted keys). Raises ConfigError with the source."""
    data: dict[str, Any] = {}
    if preset:
        data = _deep_merge(data, preset_dict(preset))
    where = f"preset {preset}" if preset else "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = _deep_merge(data, _read_yaml(p.read_text(), str(p)))
        where = str(p)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)  # None is a value too (e.g. --set models.clip.pretrained=null)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid config ({where}):"]
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from exc
