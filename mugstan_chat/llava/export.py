"""``mugstan-chat export-llava DIR``: a LLaVA directory vLLM loads, holding exactly the weights our engine uses.

vLLM runs the language model behind ``mugstan-chat serve --llm-url`` (docs/design.md section 4d);
our server keeps the CLIP tower, the STAN branch and the projector, and hands vLLM projected
features. vLLM still loads a whole LLaVA (it builds the stock tower even when it only receives
embeddings), so the export writes one: language model, projector and stock CLIP tower under the
key layout vLLM's ``LlavaForConditionalGeneration`` reads (``language_model.model.*``,
``language_model.lm_head.*``, ``multi_modal_projector.*``, ``vision_tower.vision_model.*``;
transformers 5 saves the tower as ``vision_tower.embeddings.*``, which vLLM does not map), with
config, generation config, tokenizer, processor and chat template, and the chat template vLLM serves
with (``vllm_chat_template.jinja``: the processor's, rendering each clip's label before its image as
our engine does; :mod:`mugstan_chat.llava.chat_template`, checked at export). Our loader reads the same
directory back (``--model DIR``), so both sides run the same weights. The STAN branch is not
exported: vLLM never runs the tower on our requests.

The export is written into a hidden temporary folder beside DIR that takes DIR's place once
complete (an interrupted export leaves nothing half-written); a DIR that is not empty is refused
(exit 2, before the model is built) unless ``--overwrite``.

Usage::

    mugstan-chat export-llava runs/demo-llava --demo                 # the demo model (+ its STAN branch in stan/)
    mugstan-chat export-llava runs/small-llava --size small          # random CLIP-L/14-336 + 0.47 B LM
    mugstan-chat export-llava runs/llava-7b --model llava-hf/llava-1.5-7b-hf --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .chat_template import IN_ORDER_TEMPLATE_FILE, TemplateMismatch, check_in_order_template, in_order_template
from ..output_dir import atomic_output_dir, output_dir_problem

PREFIXES = (  # transformers 5 name -> vLLM's (the pre-4.52 llava-hf layout)
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
)
EXPORT_DTYPES = ("auto", "fp32", "bf16", "fp16")


def _vllm_demo_sizes():
    from .demo import DemoSizes

    # vLLM's attention kernels need head_dim >= 32; the demo's 4 text heads have 16. The weights do not
    # depend on the head count, so 2 heads of 32 is the demo's very model with another attention split.
    return DemoSizes(text_heads=2)


def vllm_key(name: str) -> str:
    """The name vLLM's LLaVA loads a transformers 5 parameter under."""
    for old, new in PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    raise ValueError(f"unexpected LLaVA parameter {name!r}")


def export_llava(directory: str | Path, llava, processor, dtype=None) -> Path:
    """Writes ``llava`` (a stock ``LlavaForConditionalGeneration``, no video tower installed) for vLLM.

    Args:
        directory: created if missing.
        dtype: a torch dtype to store the weights in (default: as they are).
    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in llava.state_dict().items():
        if ".stan." in name or name.startswith("stan."):
            raise ValueError("export the stock LLaVA (before install_video_tower), not the video tower")
        tensor = tensor.detach().to("cpu", dtype=dtype or tensor.dtype) if tensor.is_floating_point() else tensor
        state[vllm_key(name)] = tensor.contiguous().clone()
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = llava.config
    config.torch_dtype = dtype or next(llava.parameters()).dtype
    if hasattr(config, "dtype"):
        config.dtype = config.torch_dtype
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(directory)
    llava.generation_config.save_pretrained(directory)
    if processor.chat_template and not getattr(processor.tokenizer, "chat_template", None):
        processor.tokenizer.chat_template = processor.chat_template  # vLLM may read either
    processor.save_pretrained(directory)
    write_vllm_template(directory, processor)
    return directory


def write_vllm_template(directory: Path, processor) -> Path:
    """Writes the in-order chat template vLLM serves with (:mod:`mugstan_chat.llava.chat_template`), checked as written.

    Raises :class:`~mugstan_chat.llava.chat_template.TemplateMismatch` (one line) when the file, read back, does not
    render our engine's prompt.
    """
    path = directory / IN_ORDER_TEMPLATE_FILE
    path.write_text(in_order_template(processor.chat_template, processor.image_token), encoding="utf-8")
    check_in_order_template(processor, path.read_text(encoding="utf-8"))
    return path


def build_source(args):
    """(stock LLaVA, processor) the flags name: the demo, a random ``--size`` model, or a checkpoint."""
    from .loader import load_pretrained_llava

    if args.demo:
        from .demo import build_demo_llava

        return build_demo_llava(args.seed, _vllm_demo_sizes())
    if args.size:
        from .shapes import build_random_llava

        return build_random_llava(args.size, "cpu", seed=args.seed)
    return load_pretrained_llava(args.model, "cpu", args.dtype, None)  # "auto": as the checkpoint stores it


def add_export_command(commands) -> None:
    """Adds ``export-llava`` to the ``mugstan-chat`` subcommands."""
    export = commands.add_parser("export-llava", help="write a LLaVA directory vLLM loads (docs/serve.md)")
    export.add_argument("directory", help="output directory (created; refused if not empty, see --overwrite)")
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--demo", action="store_true", help="the tiny demo model")
    which.add_argument("--size", choices=("small", "7b"), help="LLaVA-1.5 shapes with random weights")
    which.add_argument("--model", help="a transformers LLaVA checkpoint (hub id or directory)")
    export.add_argument("--dtype", choices=EXPORT_DTYPES, default="auto",
                        help="stored dtype (default: as built or as the checkpoint stores it)")
    export.add_argument("--seed", type=int, default=0, help="seed of --demo and --size weights (default: 0)")
    export.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")
    export.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from .loader import DTYPES

    problem = output_dir_problem(args.directory, args.overwrite, "DIR")
    if problem:  # a usage error, before the model is built
        print(f"mugstan-chat export-llava: error: {problem}", file=sys.stderr)
        return 2
    llava, processor = build_source(args)
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    directory = Path(args.directory)
    try:
        with atomic_output_dir(directory) as tmp:
            export_llava(tmp, llava, processor, dtype)
            if args.demo:  # our side needs the demo's STAN branch too; it is ours, vLLM never reads it
                from .demo import save_demo_branch

                save_demo_branch(tmp / "stan", args.seed, _vllm_demo_sizes())
    except TemplateMismatch as error:  # the chat template for vLLM does not render our prompt: nothing is written
        print(f"mugstan-chat export-llava: error: {error}", file=sys.stderr)
        return 1
    ours = f"--model {directory}" + (f" --stan {directory / 'stan'}" if args.demo else "")
    print(f"wrote {directory}\n  vLLM: {vllm_command(directory)} (docs/serve.md)\n"
          f"  ours: mugstan-chat serve {ours} --llm-url http://127.0.0.1:PORT/v1")
    return 0


def vllm_command(directory: Path) -> str:
    """How vLLM serves an exported directory: embeddings in, our chat template, content parts in order."""
    return (f"vllm serve {directory} --enable-mm-embeds --chat-template {directory / IN_ORDER_TEMPLATE_FILE} "
            "--chat-template-content-format openai")
