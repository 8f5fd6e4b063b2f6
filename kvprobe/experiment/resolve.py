"""Turn config sections into live objects: the model and the sample source.

Models come from the kind table (`kinds.model_kind`): `hf` is built in, the toy is a
plugin, so nothing here imports `toy_models`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..config import ExperimentConfig, ModelSection
from ..data.samples import SampleSource
from ..errors import KVProbeWarning
from .errors import ExperimentError
from .kinds import CheckpointError, model_kind, remote_code

__all__ = ["hub_access", "load_model", "make_source", "no_remote_code", "process_device"]

_RUN_REMOTE_CODE = contextvars.ContextVar("run_remote_code", default=True)  # False inside `no_remote_code`


@contextlib.contextmanager
def hub_access(allow: bool) -> Iterator[None]:
    """Offline by construction: unless `allow`, the Hugging Face hub client refuses every
    request while models and tokenizers load (its own offline mode, the switch that
    `HF_HUB_OFFLINE=1` sets), so a name that is not a local directory or in the local cache
    fails at once instead of reaching the network. With `allow`, the environment decides."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or not allow
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def process_device(device: str, env: Mapping[str, str] = os.environ) -> str:
    """The device this process uses: a bare "cuda" becomes "cuda:$LOCAL_RANK" under a
    launcher (torchrun, accelerate) that starts several processes, so each rank has its GPU."""
    if device == "cuda" and int(env.get("WORLD_SIZE", 1)) > 1 and "LOCAL_RANK" in env:
        return f"cuda:{int(env['LOCAL_RANK'])}"
    return device


@contextlib.contextmanager
def no_remote_code() -> Iterator[None]:
    """While open, `load_model` runs none of a checkpoint's own code: ``model.trust_remote_code`` is read as
    false (what `kvprobe capture --dry-run` plans with), so a model that needs its code is refused."""
    token = _RUN_REMOTE_CODE.set(False)
    try:
        yield
    finally:
        _RUN_REMOTE_CODE.reset(token)


def load_model(section: ModelSection) -> Any:
    """The model a config names, in eval mode, on its device and dtype (or spread by its device map).

    With ``model.trust_remote_code`` the checkpoint's own code runs, after a warning naming it; inside
    `no_remote_code` none of it runs: the built-in architecture loads (a warning says so), and a
    checkpoint that needs its code is refused."""
    if section.device.startswith("cuda") and not section.device_map and not torch.cuda.is_available():
        raise ExperimentError(f"model.device {section.device!r}: CUDA is not available on this machine")
    kind = model_kind(section.kind)
    code = None  # the code the checkpoint ships, when the config trusts it
    if section.trust_remote_code:
        code = ", ".join(remote_code(section.checkpoint)) or f"whatever code {section.checkpoint!r} ships"
        if _RUN_REMOTE_CODE.get():
            warnings.warn(f"model.trust_remote_code: kvprobe runs the checkpoint's own code: {code}", KVProbeWarning,
                          stacklevel=2)
        else:
            section = section.model_copy(update={"trust_remote_code": False})
    try:
        with hub_access(section.allow_download):
            model = kind.load(section)
    except FileNotFoundError as e:
        raise ExperimentError(f"model.checkpoint: {e}") from None
    except CheckpointError as e:
        raise ExperimentError(f"model.checkpoint: {e}") from None
    except (OSError, ValueError) as e:  # no weights, no config, not a model directory, offline
        if code is not None and not section.trust_remote_code and "trust_remote_code" in str(e):
            raise ExperimentError(f"model.trust_remote_code: {section.checkpoint!r} needs its own code to load "
                                  f"({code}), which --dry-run does not run") from None
        offline = "" if section.allow_download else " (offline: set model.allow_download to fetch a hub id)"
        raise ExperimentError(f"model.checkpoint: cannot load {section.checkpoint!r}{offline}: "
                              f"{str(e).splitlines()[0]}") from None
    if code is not None and not section.trust_remote_code:
        warnings.warn(f"model.trust_remote_code: --dry-run ran none of the checkpoint's own code ({code}); the plan "
                      "is of the architecture transformers knows", KVProbeWarning, stacklevel=2)
    if section.device_map:
        return model
    return model.to(device=process_device(section.device), dtype=getattr(torch, section.dtype)).eval()


def make_source(cfg: ExperimentConfig, n_samples: int | None = None) -> SampleSource:
    """The passcode samples a config asks for (`n_samples` overrides data.n_samples, e.g. for a sweep)."""
    data = cfg.data
    n = data.n_samples if n_samples is None else n_samples
    if data.kind != "traces":  # a kind's own samples: data.kind names a model kind
        if cfg.model.kind != data.kind:
            raise ExperimentError(f"data.kind: {data.kind!r} samples need model.kind {data.kind!r}")
        kind = model_kind(data.kind)
        if kind.make_source is None:
            raise ExperimentError(f"data.kind: model kind {data.kind!r} makes no samples of its own; use traces")
        try:
            return kind.make_source(cfg, n)
        except ValueError as e:
            raise ExperimentError(f"data: {e}") from None
    from transformers import AutoTokenizer

    from ..data.chat import check_template_choice, resolve_chat_template
    from ..data.trace_source import TracePasscodeSource
    from ..data.traces import read_generated, read_jsonl

    if not model_kind(cfg.model.kind).reads_text:
        raise ExperimentError(f"data.kind: traces are text, and model.kind {cfg.model.kind!r} has no text tokenizer; "
                              f"use data.kind {cfg.model.kind!r} (its own samples) or an hf model")
    if not data.traces:
        raise ExperimentError("data.traces: a traces file is needed when data.kind is 'traces'")
    from ..data.openmementos import HUB_ID, read_openmementos

    hub = data.traces_format == "openmementos" and data.traces == HUB_ID and not Path(data.traces).exists()
    if hub and not cfg.model.allow_download:
        raise ExperimentError(f"data.traces: {HUB_ID!r} is a hub dataset; set model.allow_download to fetch it, "
                              "or name a local .parquet/.jsonl file")
    if not hub and not Path(data.traces).is_file():
        raise ExperimentError(f"data.traces: no such file {data.traces!r}")
    try:
        check_template_choice(data.chat_template)  # a template file: there, before anything is loaded
    except ValueError as e:
        raise ExperimentError(f"data.{e}") from None
    name = data.tokenizer or cfg.model.checkpoint
    try:
        with hub_access(cfg.model.allow_download):
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=not cfg.model.allow_download)
    except (OSError, ValueError) as e:
        field = "data.tokenizer" if data.tokenizer else "model.checkpoint"
        offline = "" if cfg.model.allow_download else " (offline: set model.allow_download to fetch a hub id)"
        raise ExperimentError(f"{field}: cannot load a tokenizer from {name!r}{offline}: "
                              f"{str(e).splitlines()[0]}") from None
    try:
        path = Path(data.traces)
        check = data.summary_check
        if data.traces_format == "openmementos":
            with hub_access(cfg.model.allow_download):
                traces = read_openmementos(None if hub else path, summary_check=check, limit=n if hub else None,
                                           allow_download=hub and cfg.model.allow_download)
        else:
            traces = (read_jsonl(path, summary_check=check) if path.suffix == ".jsonl"
                      else [read_generated(path, summary_check=check)])
        chat_template = resolve_chat_template(data.chat_template, tokenizer)
        return TracePasscodeSource(
            traces, tokenizer, n, seed=cfg.seed, target_block=data.target_block, template=data.template,
            where=data.where, offsets=cfg.capture.offsets, chat_template=chat_template, token_ids=data.token_ids,
        )
    except ValueError as e:
        raise ExperimentError(f"data: {e}") from None
