"""Config -> hooked transformer (TransformerLens ``TransformerBridge.boot_native``); save and load.

A checkpoint is a folder holding ``model.safetensors`` (the bridge's ``state_dict``) and
``config.json`` (model config, task config and vocabulary). Folders are written under a temporary
name and renamed, so a crash never leaves half a checkpoint. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_native)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from tsds_interp import checks
from tsds_interp.task import VOCAB, TaskConfig

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "checkpoints"
SIZE_LIMITS = {"n_layers": 256, "d_model": 65536, "n_heads": 1024, "d_mlp": 262144}
ACT_FNS = ("gelu", "gelu_new", "relu", "silu")
CHECKPOINT_FILES = {"config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors",
                    "train_state.json"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the hooked transformer and the task it is trained on."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    act_fn: str = "gelu"
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self):
        if isinstance(self.task, dict):
            object.__setattr__(self, "task", TaskConfig.from_dict(self.task))
        if not isinstance(self.task, TaskConfig):
            raise ValueError(f"task must be a TaskConfig or a mapping of its settings, got {self.task!r}")
        for name, hi in SIZE_LIMITS.items():
            checks.number(name, getattr(self, name), lo=1, hi=hi, integer=True)
        checks.seed(self.seed)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"act_fn must be one of {', '.join(ACT_FNS)}, got {self.act_fn!r}")

    @property
    def n_params(self) -> int:
        """Parameters of the model this config builds."""
        d, v = self.d_model, len(VOCAB)
        block = 4 * d * d + 4 * d + 2 * d * self.d_mlp + self.d_mlp + d + 4 * d
        return self.n_layers * block + 2 * v * d + v + self.n_ctx * d + 2 * d

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_ctx(self) -> int:
        return self.task.max_len

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a model config is a mapping of its settings, got {d!r}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown model settings {unknown}")
        return cls(**d)


def memory_available() -> tuple[int, str] | None:
    """The bytes this process may hold and what bounds them: the machine's physical memory, or the
    process's address-space or data limit (``ulimit -v`` / ``-d``) where lower; None if unknown."""
    bounds = []
    try:
        bounds.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"))
    except (ValueError, OSError, AttributeError):
        pass
    for name, words in (("RLIMIT_AS", "address-space limit"), ("RLIMIT_DATA", "data-size limit")):
        soft = resource.getrlimit(getattr(resource, name))[0]
        if soft != resource.RLIM_INFINITY:
            bounds.append((soft, f"this process's {words}"))
    return min(bounds) if bounds else None


def check_fits_in_memory(cfg: ModelConfig) -> None:
    """``ValueError`` when the weights alone would not fit in the memory this process may use."""
    need, have = cfg.n_params * 4, memory_available()
    if have is not None and need > have[0]:
        raise ValueError(f"a model with these sizes has {cfg.n_params:,} parameters ({need / 2**30:.1f} GiB), "
                         f"more than {have[1]} ({have[0] / 2**30:.1f} GiB); use smaller sizes")


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> TransformerBridge:
    """A freshly initialised hooked transformer; ``cfg.seed`` fixes the weights."""
    check_fits_in_memory(cfg)
    tl_cfg = TransformerBridgeConfig(
        d_model=cfg.d_model, d_head=cfg.d_head, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
        n_ctx=cfg.n_ctx, d_vocab=len(VOCAB), d_mlp=cfg.d_mlp, act_fn=cfg.act_fn,
        normalization_type="LN", seed=cfg.seed, model_name="tsds_interp",
    )
    model = TransformerBridge.boot_native(tl_cfg, device=device)
    model.tsds_config = cfg
    model.eval()
    return model


def grow(model, add_layers: int, seed: int = 0) -> TransformerBridge:
    """A deeper copy of ``model`` that computes exactly the same function: ``add_layers`` new blocks
    on top, freshly initialised except their output projections (attention ``o`` and MLP ``out``),
    which are zero, so each new block adds nothing to the residual stream until training moves them."""
    if add_layers < 0:
        raise ValueError(f"add_layers must be >= 0, got {add_layers}")
    cfg = config_of(model)
    bigger = build_model(ModelConfig(**{**cfg.to_dict(), "n_layers": cfg.n_layers + add_layers, "seed": seed}),
                         device=next(model.parameters()).device)
    state = bigger.state_dict()
    for k, v in model.state_dict().items():
        state[k] = v.clone()
    for layer in range(cfg.n_layers, cfg.n_layers + add_layers):
        for name in ("attn.o.weight", "attn.o.bias", "mlp.out.weight", "mlp.out.bias"):
            state[f"blocks.{layer}.{name}"] = torch.zeros_like(state[f"blocks.{layer}.{name}"])
    bigger.load_state_dict(state)
    return bigger


def config_of(model, takes_task: bool = False) -> ModelConfig:
    """The :class:`ModelConfig` a model was built from (``takes_task``: the caller accepts a
    ``task=`` argument instead, which the error then suggests)."""
    cfg = getattr(model, "tsds_config", None)
    if cfg is None:
        fix = ("pass task=TaskConfig(...)" if takes_task else
               "this works on models built by tsds_interp.model.build_model or load; for your own model use "
               "tsds_interp.traces (role_attribution, ds_counts, patch, generate)")
        raise ValueError(f"this model was not built by tsds_interp.model.build_model/load, so it has no task; {fix}")
    return cfg


def task_of(model, task: TaskConfig | None = None) -> TaskConfig:
    """``task``, checked against the model's own task where the model has one (the width, format and
    answer order fix the token layout), or the model's task when ``task`` is None."""
    own = getattr(model, "tsds_config", None)
    if task is None:
        return config_of(model, takes_task=True).task
    if own is not None:
        for field_name in ("width", "task_format", "answer_order"):
            if getattr(task, field_name) != getattr(own.task, field_name):
                raise ValueError(f"the task has {field_name}={getattr(task, field_name)!r} but the model was trained "
                                 f"with {getattr(own.task, field_name)!r}; pass the model's task (or none)")
    return task


def save(model, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model`` to the folder ``path`` atomically. ``path`` must be new, empty or a
    checkpoint (which is replaced); any other folder or a file is refused, so nothing of the
    user's is deleted. Non-finite weights are refused."""
    path = Path(path)
    check_save_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write_checkpoint_files(model, tmp, extra)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_checkpoint(path: Path) -> bool:
    """A folder holding a model and config and nothing but checkpoint files."""
    names = {p.name for p in path.iterdir()}
    return {"config.json", "model.safetensors"} <= names <= CHECKPOINT_FILES


def check_save_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; save the checkpoint to a folder")
    if path.is_dir() and any(path.iterdir()) and not is_checkpoint(path):
        raise ValueError(f"{path} holds files that are not a tsds_interp checkpoint; save into a new or "
                         "empty folder, or over a checkpoint")
    checks.writable_dir(path, "checkpoint folder")


def check_finite(model) -> None:
    """``FloatingPointError`` naming the first weight that holds NaN or infinity."""
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FloatingPointError(f"weight {k} is not finite; the model is not saved")


def write_checkpoint_files(model, folder: Path, extra: dict | None = None) -> None:
    check_finite(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    meta = {"format_version": FORMAT_VERSION, "model": config_of(model).to_dict(),
            "vocab": list(VOCAB), **(extra or {})}
    (folder / "config.json").write_text(json.dumps(meta, indent=2))


def apply_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and its files) the modes the user's umask gives new
    files (``mkdtemp`` and safetensors create them private)."""
    mask = os.umask(0)
    os.umask(mask)
    if path.is_file():
        path.chmod(0o666 & ~mask)
        return
    path.chmod(0o777 & ~mask)
    for f in path.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


def _old(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.old")


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing ``dst`` with as short a window as a rename allows; a crash
    between the two renames leaves ``dst``'s previous version in ``.NAME.old``, which
    :func:`recover_dir` puts back."""
    apply_umask(src)
    recover_dir(dst)
    old = None
    if dst.exists():
        old = _old(dst)
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: Path) -> bool:
    """Put back ``dst`` from ``.NAME.old`` when a replace was interrupted between its renames."""
    old = _old(dst)
    if not dst.exists() and old.is_dir():
        old.rename(dst)
        return True
    return False


def shipped_names() -> list[str]:
    """The shipped checkpoints (a ship that was stopped is first completed or undone, where the
    package folder can be written)."""
    if not SHIPPED_DIR.is_dir():
        return []
    from tsds_interp.ship import finish_ship

    try:
        finish_ship(SHIPPED_DIR)
    except OSError:
        pass  # a read-only install: list what is there
    return sorted(p.name for p in SHIPPED_DIR.iterdir()
                  if not p.name.startswith(".") and (p / "config.json").is_file())  # not ship's temp folders


def checkpoint_label(path: str | os.PathLike) -> str:
    """A short name for a checkpoint folder in titles: its name, with its stage folder's for a
    stage's ``checkpoint`` folder (``runs/x/sft/checkpoint`` -> ``sft/checkpoint``)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.name == "checkpoint" else path.name


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A checkpoint folder from a path or the name of a shipped checkpoint."""
    path = Path(name_or_path)
    recover_dir(path)
    recover_dir(path / "checkpoint")
    if path.is_dir():
        # A training stage folder holds its model in checkpoint/.
        if not (path / "config.json").exists() and (path / "checkpoint" / "config.json").is_file():
            return path / "checkpoint"
        return path
    if str(name_or_path) in shipped_names():
        return SHIPPED_DIR / str(name_or_path)
    names = ", ".join(shipped_names()) or "none"
    raise CheckpointError(f"no checkpoint folder or shipped checkpoint named {str(name_or_path)!r} "
                          f"(shipped: {names}); pass a folder written by tsds_interp.model.save")


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a tsds_interp checkpoint "
                              "(write one with tsds_interp.model.save)")
    try:
        meta = checks.read_json(cfg_file, "checkpoint config")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if "model" not in meta:
        raise CheckpointError(f"{cfg_file} has no 'model' section; re-save the checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file} has format version {meta.get('format_version')!r}; this version "
                              f"of tsds_interp reads version {FORMAT_VERSION}: re-save it with this version")
    if meta.get("vocab") != list(VOCAB):
        raise CheckpointError(f"{cfg_file} was written with another vocabulary "
                              f"({meta.get('vocab')}); this version uses {list(VOCAB)}: retrain it")
    return meta


def checkpoint_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """The checked :class:`ModelConfig` of a checkpoint, without reading its weights."""
    path = resolve_checkpoint(name_or_path)
    meta = read_config(path)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        check_fits_in_memory(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'} has a bad model config ({e}); re-save it") from None
    return cfg


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> TransformerBridge:
    """Load a checkpoint folder (or a shipped checkpoint by name) as a hooked model in eval mode.
    Checked: format version, config types and sizes, tensor names, shapes, dtype (float32) and
    finiteness."""
    path = resolve_checkpoint(name_or_path)
    cfg = checkpoint_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has no model.safetensors; re-save the checkpoint")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e}); re-save it") from None
    model = build_model(cfg, device=device)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}; re-save the checkpoint")
    for k, v in expected.items():
        if v.shape != state[k].shape:
            raise CheckpointError(f"{weights}: {k} has shape {tuple(state[k].shape)} but the config "
                                  f"needs {tuple(v.shape)}; re-save the checkpoint")
        if state[k].dtype != torch.float32:
            raise CheckpointError(f"{weights}: {k} is {state[k].dtype}, not torch.float32; re-save the "
                                  "checkpoint from a float32 model")
        if not torch.isfinite(state[k]).all():
            raise CheckpointError(f"{weights}: {k} holds NaN or infinite values; use an earlier checkpoint")
    model.load_state_dict(state)
    model.eval()
    return model


def autocast(device: str | torch.device, mode: str = "none"):
    """bfloat16 autocast on ``device`` when ``mode == 'bf16'``, else a no-op context."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mode == "bf16")
