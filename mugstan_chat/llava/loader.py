"""The one loader of the chat model, shared by the CLI, the web app and the benchmarks.

``load_chat_model`` loads a transformers LLaVA (or builds the offline demo model),
optionally quantises its language model to 4/8 bit, loads a STAN branch onto
LLaVA's own CLIP tower and installs the video tower (docs/design.md section 4).

Example::

    chat_model = load_chat_model("llava-hf/llava-1.5-7b-hf", stan="path/to/branch")
    chat_model = load_chat_model(demo=True)   # offline, tiny, meaningless answers
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from .tower import TEMPORAL_MODES, VideoTower, install_video_tower, load_stan_branch
from ..options import DEFAULT_MODEL
from ..session_options import DEFAULTS

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("auto", "cuda", "cpu", "mps")
# full module names (transformers matches skip patterns from the start of the name, or as a suffix)
QUANT_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
MEAN_FALLBACK_NOTICE = "no STAN branch given: temporal mean mode (training-free baseline)"


class ModelLoadError(Exception):
    """The chat model cannot be loaded (missing weights, offline, bad options); one-line message."""


@dataclass
class ChatSettings:
    """How a chat model was loaded, and the defaults sessions inherit."""

    model: str  # hub id or directory ("demo" for the demo model)
    temporal: str  # "stan" or "mean" (after any fallback)
    stan: str | None  # loaded branch (path or hub id; "demo" for the demo's own); None: mean only
    frames: int  # T: frames per clip
    clips: int  # C: clips per video
    device: str
    dtype: str
    quantization: str | None  # None, "4bit" or "8bit"
    demo: bool
    retrieval_clip: str | None = None  # CLIP checkpoint whose text tower ranks clips (--retrieval-clip)


@dataclass
class ChatModel:
    """A loaded LLaVA with the video tower installed: what chat sessions run on."""

    model: nn.Module  # LlavaForConditionalGeneration
    processor: object  # LlavaProcessor
    tower: VideoTower
    settings: ChatSettings
    notices: list[str] = field(default_factory=list)
    llm: object = None  # a remote_llm.RemoteLLM answering instead of ``model``'s language model (--llm-url)
    # clip selection's text side (retrieval.Retriever, or the SelectionUnavailable it met), loaded on first use
    retrieval: object | None = None
    retrieval_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def notice(self) -> str:
        """Human-readable notes for users (demo model, mean fallback, domain shift); '' if none."""
        return "; ".join(self.notices)

    @property
    def device(self) -> torch.device:
        return self.tower.device

    @property
    def context_length(self) -> int:
        """Tokens the language model can attend to (prompt + answer)."""
        return int(self.model.config.text_config.max_position_embeddings)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda, then mps, then cpu; an explicit device must be available."""
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but no CUDA GPU is available")
    if device == "mps" and not has_mps:
        raise ModelLoadError("device 'mps' requested but Apple MPS is not available")
    return device


def native_cpu_bf16() -> str | None:
    """The instruction set with which this CPU computes bf16 natively ("AMX", "avx512_bf16"), or None.

    Why it matters: on such CPUs oneDNN runs bf16 matmuls at about twice fp32's rate (LLaVA's
    CLIP-L/14-336 on 4 frames: 8.6 s fp32, 3.4 s bf16 on an EPYC with avx512_bf16); elsewhere
    bf16 is emulated and slower than fp32.
    """
    cpu = getattr(torch, "cpu", None)
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return name
        except RuntimeError:  # a torch build without the probe's backend
            continue
    return None


def resolve_dtype(dtype: str = "auto", device: str = "cpu") -> str:
    """'auto' -> bf16 on CUDA (fp16 where bf16 is unsupported), fp16 on MPS; on CPU bf16 where the CPU
    computes it natively (:func:`native_cpu_bf16`), else fp32."""
    if dtype == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device == "mps":
            return "fp16"
        return "bf16" if native_cpu_bf16() else "fp32"
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected auto, {', '.join(DTYPES)}")
    return dtype


def quant_compute_dtype(dtype: str, device: str) -> torch.dtype:
    """The dtype quantised layers compute in (and the skipped tower and projector keep): the model's,
    except fp32 on a GPU, where bitsandbytes' kernels want 16 bit."""
    return torch.float16 if dtype == "fp32" and device != "cpu" else DTYPES[dtype]


def build_quantization_config(load_4bit: bool = False, load_8bit: bool = False,
                              compute_dtype: torch.dtype = torch.float16):
    """A ``BitsAndBytesConfig`` quantising the language model only, or None (bitsandbytes >= 0.49 runs on CPU too).

    The CLIP tower, the STAN branch (installed later), the projector and the LM head
    stay in 16 bit: they are small, and quantising the tower would change the
    features the branch was trained on.
    """
    if load_4bit and load_8bit:
        raise ModelLoadError("choose one of --load-4bit and --load-8bit")
    if not (load_4bit or load_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  llm_int8_skip_modules=list(QUANT_SKIP_MODULES))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(QUANT_SKIP_MODULES))


def load_chat_model(model: str = DEFAULT_MODEL, stan: str | os.PathLike | None = None, temporal: str = "stan",
                    device: str = "auto", dtype: str = "auto", load_4bit: bool = False, load_8bit: bool = False,
                    frames: int = DEFAULTS.frames, clips: int = 1, demo: bool = False,
                    allow_resolution_mismatch: bool = False, seed: int = 0) -> ChatModel:
    """Loads LLaVA (or the demo model), the STAN branch, and installs the video tower.

    Args:
        model: hub id or local directory of a transformers LLaVA checkpoint (ignored with ``demo``).
        stan: STAN branch directory or hub id; None in "stan" mode falls back to "mean"
            (with a notice), except for the demo model, which has its own tiny branch (built
            in "stan" mode only). A given branch is loaded in both modes, so sessions may
            still pick "stan".
        temporal: "stan" or "mean": the tower's default mode (sessions may override it).
        device: "auto", "cuda", "cpu" or "mps".
        dtype: "auto", "bf16", "fp16" or "fp32" (tower, branch and projector always use it;
            the language model too unless quantised).
        load_4bit, load_8bit: quantise the language model with bitsandbytes (CUDA or CPU; the demo
            model too, through the same ``from_pretrained`` path as real checkpoints).
        frames, clips: defaults for chat sessions (T frames per clip, C clips per video).
        demo: build the tiny offline demo model instead (answers are meaningless).
        allow_resolution_mismatch: accept a branch trained at another image size.
        seed: seed of the demo model.
    Returns:
        A :class:`ChatModel`.
    Raises:
        ModelLoadError, CheckpointError (from :mod:`mugstan_chat.model.checkpoint`).
    """
    if temporal not in TEMPORAL_MODES:
        raise ModelLoadError(f"unknown temporal mode {temporal!r}; expected one of {', '.join(TEMPORAL_MODES)}")
    if frames < 1 or clips < 1:
        raise ModelLoadError(f"frames and clips must be positive (got frames={frames}, clips={clips})")
    device = resolve_device(device)
    notices: list[str] = []
    if demo and dtype == "auto" and device == "cpu":
        dtype = "fp32"  # the demo is a correctness fixture of toy width: bf16 would only round its flat logits
    elif dtype == "auto" and device == "cpu":
        dtype = resolve_dtype(dtype, device)
        native = native_cpu_bf16()
        notices.append(f"--dtype auto chose bf16: this CPU computes bf16 natively ({native})" if native else
                       "--dtype auto chose fp32: this CPU would emulate bf16")
        logger.warning(notices[-1])
    dtype = resolve_dtype(dtype, device)
    quant = build_quantization_config(load_4bit, load_8bit, quant_compute_dtype(dtype, device))
    if demo:
        from ..model.backbone import HFCLIPVision
        from .demo import DEMO_NOTICE, build_demo_branch, build_demo_llava

        llava, processor = build_demo_llava(seed)
        if quant is not None:
            llava = _quantised_copy(llava, device, dtype, quant)
        else:
            llava = llava.to(device=device, dtype=DTYPES[dtype])
        notices.insert(0, DEMO_NOTICE)
        name = "demo"
    else:
        llava, processor = load_pretrained_llava(model, device, dtype, quant)
        name = str(model)
    branch, branch_name = None, None
    if stan is not None:  # loaded in either mode, so sessions can still choose "stan"
        branch = load_stan_branch(stan, llava.model.vision_tower, llava.config.vision_feature_layer,
                                  allow_image_size_mismatch=allow_resolution_mismatch)
        branch_name = str(stan)
        saved_size = branch.trained_fingerprint.get("image_size")
        if saved_size is not None and saved_size != llava.config.vision_config.image_size:
            notices.append(f"STAN branch trained at {saved_size} px runs on a "
                           f"{llava.config.vision_config.image_size} px tower (known domain shift)")
    elif demo and temporal == "stan":  # the demo's own branch; a mean-mode demo is the mean-only baseline
        branch, branch_name = build_demo_branch(HFCLIPVision(llava.model.vision_tower), seed), "demo"
    if branch is None and temporal == "stan":
        notices.append(MEAN_FALLBACK_NOTICE)
        logger.warning(MEAN_FALLBACK_NOTICE)
        temporal = "mean"
    tower = install_video_tower(llava, branch, mode=temporal)
    llava.eval()
    settings = ChatSettings(model=name, temporal=temporal, stan=branch_name,
                            frames=frames, clips=clips, device=device, dtype=dtype,
                            quantization=None if quant is None else ("4bit" if load_4bit else "8bit"), demo=demo)
    return ChatModel(model=llava, processor=processor, tower=tower, settings=settings, notices=notices)


def _quantised_copy(llava, device: str, dtype: str, quant):
    """A model built in memory (the demo), quantised through ``from_pretrained`` like any checkpoint.

    Why a round trip through a temporary directory: transformers quantises while it loads
    weights, and that path is the one real checkpoints take, so the demo tests it.
    """
    import tempfile

    from transformers import LlavaForConditionalGeneration

    with tempfile.TemporaryDirectory(prefix="mugstan-quant-") as folder:
        llava.save_pretrained(folder)
        quantised = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=DTYPES[dtype], quantization_config=quant, device_map=_device_map(device))
    _keep_unquantised_parts(quantised, dtype, device)
    quantised.generation_config = llava.generation_config
    return quantised


def _device_map(device: str) -> dict:
    return {"": 0 if device == "cuda" else device}


def _keep_unquantised_parts(llava, dtype: str, device: str) -> None:
    """The tower and projector stay in the compute dtype (bitsandbytes may load skipped modules otherwise)."""
    for part in (llava.model.vision_tower, llava.model.multi_modal_projector):
        part.to(quant_compute_dtype(dtype, device))


def load_pretrained_llava(name: str, device: str, dtype: str, quant):
    """transformers LLaVA + its processor (stock, no video tower); every failure becomes one ModelLoadError line.

    ``dtype``: a key of :data:`DTYPES`, or "auto" for the checkpoint's own (``export-llava``).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..model.hub import HubUnavailable, resolve_hub_access

    try:  # seconds, not minutes of retries, when the hub is off and the model is not cached
        local_only = resolve_hub_access(name)
    except HubUnavailable as error:
        raise ModelLoadError(f"cannot load model {name}: {error}") from None
    kwargs = {"dtype": DTYPES.get(dtype, "auto"), "local_files_only": local_only}  # "auto": as stored
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map=_device_map(device))
    elif device == "cuda":
        kwargs["device_map"] = {"": 0}
    try:
        processor = AutoProcessor.from_pretrained(name, local_files_only=local_only)
        llava = LlavaForConditionalGeneration.from_pretrained(name, **kwargs)
    except Exception as error:  # offline without a cache, unknown repo, not a LLaVA, bitsandbytes missing
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = " (offline: the weights must already be in the Hugging Face cache or a local directory)" \
            if offline else ""
        raise ModelLoadError(f"cannot load model {name}{hint}: {reason}") from error
    if "device_map" not in kwargs:
        llava = llava.to(device)
    if quant is not None:
        _keep_unquantised_parts(llava, dtype, device)
    return llava, processor
