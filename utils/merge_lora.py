#!/usr/bin/env python
"""Merge LoRA adapter files into a base model: a diffusers folder to train on or sample from, and beside it the
original-layout single file that AUTOMATIC1111 and ComfyUI load.

    python utils/merge_lora.py --base my_model --lora style.safetensors:0.8 --lora detail.safetensors:0.5 \\
      --out merged

writes `merged/` (fp16 unless --full_precision) and `merged.safetensors` (+ `merged.yaml` for SD2). Each adapter
adds `strength` times its change to the weights it covers (W + strength * (W' - W), W' the weight with the adapter
as trained: for LoRA W + up @ down * alpha / rank), so strength 1 is the adapter as trained, 0.5 half of its change,
and a negative one subtracts it. LoRA files go through diffusers' loader; DoRA, LoHa and LoKr files, which diffusers
cannot load, through peft's layers of their kind. `--base` is anything
train.py's `resume_ckpt` takes: a diffusers folder, a ckpt_cache/ name, a .ckpt/.safetensors file, a Hub id.

This module owns reading `--lora file[:strength]`, checking an adapter file before any model loads, applying
adapters to a diffusers pipeline (utils/generate.py uses the same), and the merge. Loading and writing models
are the trainer's own (trainer/models/load.py, trainer/saves/checkpoints.py), so a merged folder is an ordinary base model.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python utils/...` from anywhere
# Loading a text encoder's adapters makes transformers report every base weight as "MISSING" (an adapter file holds
# none); that is expected here and would bury what matters.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from common.console import quiet_library_noise  # noqa: E402  (after sys.path above)
from common.safetensors_header import HeaderError, read_header  # noqa: E402
from trainer.errors import UserError  # noqa: E402

quiet_library_noise()

# Where an adapter's down factor is named in the layouts diffusers' load_lora_weights reads: kohya's (what train.py
# writes, and A1111/ComfyUI/kohya's tools), peft's, and diffusers' older attention-processor one.
DOWN_MARKERS = (".lora_down.", ".lora_A.", ".lora.down.", ".lora_linear_layer.down.", ".hada_w1_a", ".lokr_w1")
ADAPTER_FILE_HINT = ("a LoRA .safetensors file (e.g. the 'Saved LoRA:' path of a train.py --lora_rank run; LoRA, DoRA, "
                     "LoHa or LoKr)")
BUNDLE_PREFIX = "bundle_emb."  # embeddings kept inside a LoRA file (pivotal tuning), by name


class LoraError(UserError):
    """A --lora argument that cannot be used; the text is one line: what was found, expected, and what to do."""

    exit_code = 2


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    strength: float

    def describe(self) -> str:
        return f"{self.path} at strength {self.strength:g}"


# ---------------------------------------------------------------- reading --lora, before any model loads


def parse_lora(text: str) -> LoraSpec:
    """`file[:strength]` (strength 1.0 when left out), its file checked to be a LoRA; raises LoraError."""
    path, strength = split_suffix(text, "1")
    try:
        value = float(strength)
    except ValueError:
        raise LoraError(f"--lora {text}: the strength {strength!r} is not a number; expected file[:strength] with a "
                        "number such as 0.8 (1.0 when left out).") from None
    if not math.isfinite(value):
        raise LoraError(f"--lora {text}: the strength {strength} is not a finite number; give one such as 0.8.")
    check_lora_file(Path(path))
    return LoraSpec(Path(path), value)


def split_suffix(text: str, default: str) -> tuple[str, str]:
    """(file, suffix text) of `file[:suffix]` (a LoRA's strength, an embedding's token). A file that exists under the
    whole text is taken whole (its name may hold a ':'); otherwise what follows the last ':' is the suffix, unless it
    is a path (C:\\x, a/b:c/d); `default` when there is none."""
    if Path(text).is_file() or ":" not in text:
        return text, default
    head, tail = text.rsplit(":", 1)
    if not head or "/" in tail or "\\" in tail:
        return text, default
    return head, tail


def check_lora_file(path: Path) -> None:
    """Raise LoraError unless `path` is a whole safetensors file holding LoRA factors (read from its header only)."""
    if path.is_dir():
        inside = path / f"{path.name}.safetensors"
        hint = f" the adapter of a LoRA save is the file inside it: --lora {inside}" if inside.is_file() else \
            f" expected {ADAPTER_FILE_HINT}"
        raise LoraError(f"--lora {path} is a folder, not a file;{hint}.")
    if not path.is_file():
        raise LoraError(f"--lora {path}: no such file; expected {ADAPTER_FILE_HINT}. Check the path.")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"--lora {path} is a {path.suffix or 'suffix-less'} file; expected {ADAPTER_FILE_HINT} "
                        "(pickled .ckpt/.pt files can run code and are not read). Use the adapter's .safetensors.")
    try:
        header = read_header(path)
    except HeaderError as err:
        raise LoraError(f"--lora {path} is {err}; expected {ADAPTER_FILE_HINT}.") from None
    except OSError as err:
        raise LoraError(f"--lora {path} cannot be read ({err.strerror}); expected {ADAPTER_FILE_HINT}.") from None
    if header.size_problem():
        raise LoraError(f"--lora {path} is {header.size_problem()}; the file is damaged: copy or download it again.")
    if not adapter_layers(header.tensors):
        first = next(iter(header.tensors), None)
        held = f"its {len(header.tensors)} tensors (e.g. {first})" if first else "it holds no tensors and"
        raise LoraError(f"--lora {path} is not a LoRA: {held} have no adapter names (kohya's .lora_down/.lora_up, "
                        "LyCORIS's .hada_*/.lokr_* or peft's .lora_A/.lora_B); a whole model goes to --base, not "
                        "--lora.")


def adapter_layers(keys: Iterable[str]) -> set[str]:
    """The layers a LoRA file's tensors adapt: the distinct names before each down factor's marker."""
    layers = set()
    for key in keys:
        marker = next((m for m in DOWN_MARKERS if m in key), None)
        if marker is not None:
            layers.add(key.split(marker, 1)[0])
    return layers


def parse_loras(texts: Sequence[str]) -> list[LoraSpec]:
    return [parse_lora(text) for text in texts]


# ---------------------------------------------------------------- adapters on a pipeline


def apply_loras(pipe, specs: Sequence[LoraSpec]) -> tuple[list[str], dict]:
    """Apply each adapter file to `pipe` at its strength: LoRA files through diffusers' load_lora_weights (one named
    adapter per file; returned, for fuse_lora), the kinds diffusers cannot load (DoRA, LoHa, LoKr) fused into the
    weights by peft's own layers (trainer/adapters/lora_file.py). Also returns the embeddings bundled in the files
    (pivotal tuning: name -> vectors), which are prompt words rather than weights. Raises LoraError for a file that
    does not fit the model."""
    names, strengths, bundled, loras = [], [], {}, []
    for spec in specs:  # the other kinds first: they are fused into plain layers, before diffusers wraps any
        tensors, found = bundle_split(spec)
        bundled.update(found)
        if adapter_kind(tensors) == "lora":
            loras.append((spec, tensors))
        else:
            fuse_adapter(pipe, spec, tensors)
    for spec, tensors in loras:
        names.append(f"lora{len(names) + 1}")
        strengths.append(spec.strength)
        load_adapter(pipe, spec, tensors, names[-1])
    if names:
        pipe.set_adapters(names, adapter_weights=strengths)
    return names, bundled


def bundle_split(spec: LoraSpec) -> tuple[dict, dict]:
    """(the file's adapter tensors, the embeddings it bundles: kohya's and AUTOMATIC1111's `bundle_emb.<name>.*`,
    which diffusers' loader refuses inside a LoRA: name -> vectors)."""
    from safetensors.torch import load_file

    tensors = load_file(str(spec.path))
    bundled = {key.split(".")[1]: tensors.pop(key) for key in [k for k in tensors if k.startswith(BUNDLE_PREFIX)]}
    return tensors, bundled


def adapter_kind(tensors: dict) -> str:
    """lora, or the kind (dora, loha, lokr) a kohya/LyCORIS file holds; a peft- or diffusers-named file is LoRA."""
    from convert.lora_kohya import file_kind

    return file_kind(tensors) or "lora"


def fuse_adapter(pipe, spec: LoraSpec, tensors: dict) -> None:
    """A DoRA, LoHa or LoKr file fused into the pipeline's UNet and text encoder at its strength."""
    from trainer.adapters.lora_file import fuse_adapter_file

    try:
        fuse_adapter_file(tensors, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, spec.strength)
    except UserError as err:
        raise LoraError(f"--lora {spec.path} does not fit this base model: {err}: use one made for it, or another "
                        "base.") from None


def load_adapter(pipe, spec: LoraSpec, tensors: dict, name: str) -> None:
    """One LoRA file's adapters into `pipe` as adapter `name`, every one of its layers placed, or LoraError."""
    with quiet_diffusers(), warnings.catch_warnings():
        # peft warns that a model with adapters gets another one: several files are exactly that here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        try:
            pipe.load_lora_weights(tensors, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as err:
            raise LoraError(f"--lora {spec.path} does not fit this base model ({mismatch_detail(err)}); expected a "
                            "LoRA trained on a model of the base's family and size: use one made for it, or another "
                            "base.") from None
    expected = len(adapter_layers(read_header(spec.path).tensors))
    placed = adapted_layer_count(pipe, name)
    if placed < expected:
        # diffusers only warns about adapter tensors that name no layer of the model, and drops them
        raise LoraError(f"--lora {spec.path}: only {placed} of its {expected} adapted layers exist in this base model "
                        "(the rest name layers it does not have); expected a LoRA made for this model's family: use "
                        "one made for it, or another base.")


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers logs a failed adapter load at ERROR level before raising it: the raised error is reported here, once,
    in one line."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def mismatch_detail(err: BaseException) -> str:
    """The telling line of a failed load: torch lists every size mismatch; the first one says enough."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else repr(err))
    return detail.rstrip(".")


def adapted_layer_count(pipe, name: str) -> int:
    """How many layers of the UNet and text encoder carry adapter `name` (peft keeps its factors in `lora_A`)."""
    return sum(1 for model in (pipe.unet, pipe.text_encoder) for module in model.modules()
               if name in getattr(module, "lora_A", {}))


# ---------------------------------------------------------------- the merge


def check_out(out: Path) -> None:
    """The merge never replaces anything: its folder, single file and yaml must all be new names."""
    if out.suffix.lower() in (".safetensors", ".ckpt"):
        raise LoraError(f"--out {out} names a file; expected a folder name: the single file is written beside the "
                        f"folder as <out>.safetensors. Use --out {out.with_suffix('')}.")
    taken = [p for p in (out, out.with_name(out.name + ".safetensors"), out.with_name(out.name + ".yaml"))
             if p.exists()]
    if taken:
        raise LoraError(f"--out {out}: {taken[0]} already exists and a merge never replaces anything; choose another "
                        "--out, or remove it first.")


def merged_pipeline(base: str, specs: Sequence[LoraSpec]):
    """The base model with every adapter fused in at its strength, the adapter layers then removed: a plain pipeline
    (diffusers' documented recipe: load_lora_weights, set_adapters, fuse_lora, unload_lora_weights). Returns
    (pipeline, models)."""
    from trainer.evaluation.sampling import sd_pipeline
    from trainer.models.load import load_models

    try:  # fp32 whatever the files store: the deltas are added in fp32 and the sum rounded once, when written
        models = load_models(base)
    except UserError as err:  # its text speaks of resume_ckpt, which --base stands for here
        wrapped = UserError(f"--base {base}: {err}")
        wrapped.exit_code = err.exit_code
        raise wrapped from None
    pipe = sd_pipeline(models.unet, models.text_encoder, models.vae, models.tokenizer, models.sample_scheduler)
    names, bundled = apply_loras(pipe, specs)
    if bundled:  # an embedding is a prompt word, not a weight: nothing of it can be fused into the model
        print(f"Not merged: the embedding{'s' if len(bundled) > 1 else ''} {', '.join(sorted(bundled))} bundled in the "
              "LoRA: use the <token>.safetensors beside it (AUTOMATIC1111's or ComfyUI's embeddings folder, or "
              "utils/generate.py --embedding) with the merged model.")
    if names:  # the other kinds are fused already
        pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    return pipe, models


def write_merged_folder(pipe, model_dir: Path, out: Path, full_precision: bool) -> None:
    """The merged pipeline as the diffusers folder `out`, in the save dtype: whole or not at all."""
    import torch

    from common.files import atomic_folder
    from trainer.saves.checkpoints import component_weights, weight_problems, write_model_folder

    dtype = torch.float32 if full_precision else torch.float16
    modules = {name: getattr(pipe, name) for name in ("unet", "vae", "text_encoder")}
    # the UNet and text encoder hold the fused weights in memory; the VAE is the base's, read from its own files
    weights = component_weights(model_dir, modules, {"unet", "text_encoder"}, dtype)
    problems = weight_problems(weights)
    if problems:
        raise UserError(f"the merged weights are not all finite in {'fp32' if full_precision else 'fp16'} "
                        f"({'; '.join(problems)}); nothing was written. Lower the strengths, or add --full_precision "
                        "if a weight legitimately exceeds fp16's range.")
    with atomic_folder(out) as partial:
        write_model_folder(partial, pipe, weights)


def merge(args: argparse.Namespace, specs: Sequence[LoraSpec]) -> None:
    """Fuse, write the folder, then its single file; a file-system failure becomes a UserError saying what is left."""
    from convert import ConversionError
    from trainer.saves.checkpoints import io_failure, write_single_file

    out = Path(args.out)
    pipe, models = merged_pipeline(args.base, specs)
    for spec in specs:
        print(f"Merged {spec.describe()}")
    try:
        write_merged_folder(pipe, Path(models.info.path), out, args.full_precision)
    except Exception as err:  # a full disk, a read-only mount; anything else is a bug and keeps its traceback
        failure = io_failure(err)
        if failure is None:
            raise
        raise UserError(f"could not write the merged model {out}: {failure}. Nothing of it was left behind; free "
                        "space or choose another --out.") from None
    print(f"Saved model: {out.resolve()}")
    try:
        single = write_single_file(out.resolve(), half=not args.full_precision)
    except Exception as err:  # the folder is whole: only its single file is missing
        failure = str(err) if isinstance(err, ConversionError) else io_failure(err)
        if failure is None:
            raise
        raise UserError(f"the merged model {out} is written and complete, but its single file could not be: "
                        f"{failure}. Nothing of that file was left behind. Export it later with python utils/convert_"
                        f"diffusers_to_original_stable_diffusion.py --model_path {out} --checkpoint_path "
                        f"{out}.safetensors") from None
    print(f"Saved single file: {single}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base model: anything train.py's resume_ckpt takes")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]",
                   help="an adapter file and its strength (default 1.0); repeat to merge several")
    p.add_argument("--out", required=True, help="the diffusers folder to write; <out>.safetensors goes beside it")
    p.add_argument("--full_precision", action="store_true", help="write fp32 weights (default: fp16)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        specs = parse_loras(args.lora)  # every argument judged before a model loads
        check_out(Path(args.out))
        merge(args, specs)
    except UserError as err:
        print(f"merge_lora.py: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
