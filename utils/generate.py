#!/usr/bin/env python
"""Generate images from a saved diffusers model folder, to look at what a run learned.

    python utils/generate.py --model logs/<run>/ckpts/last-... --prompt "a red circle" --out sample.png

With `--lora file[:strength]` (repeatable) LoRA adapter files, such as a LoRA run's saves, apply to the model at
their strengths (default 1.0) without changing it: the same adapters and strengths utils/merge_lora.py fuses in.
Embeddings bundled in a LoRA file (pivotal tuning) come with it, called by their names. With `--embedding
file[:token]` (repeatable) an embedding file (textual inversion, such as an embedding run's `<token>.safetensors`)
joins the prompt's vocabulary as `token` (default: the file's name), the way diffusers' load_textual_inversion
adds it: write the token in the prompt.

    python utils/generate.py --model my_model --embedding logs/<run>/ckpts/last-.../sks-dog.safetensors \
      --prompt "a photo of sks-dog on the beach"
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python utils/...` from anywhere
# a text encoder's adapters make transformers list every base weight as "MISSING" (an adapter file holds none)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from utils.merge_lora import LoraError, apply_loras, parse_loras, split_suffix  # noqa: E402  (after sys.path above)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers model folder (e.g. a 'Saved model:' path)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", default="sample.png", help="PNG to write")
    parser.add_argument("--size", type=int, default=None, help="width and height; default: the model's native size")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="a LoRA adapter file to apply, at a strength (default 1.0); repeat for several")
    parser.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                        help="an embedding file and the token prompts call it by (default: the file's name); repeat "
                             "for several")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        loras = parse_loras(args.lora)  # judged before the slow imports and the model load
        embeddings = [parse_embedding(text) for text in args.embedding]
    except LoraError as err:
        print(f"generate.py: {err}", file=sys.stderr)
        return err.exit_code
    import torch
    from diffusers import StableDiffusionPipeline

    from data.captions import spell_out_vectors, token_groups
    from trainer.adapters.embedding_file import read_embedding_file
    from trainer.evaluation.sampling import prompts_spelled_out_by_caller

    if not (Path(args.model) / "model_index.json").is_file():
        print(f"generate.py: {args.model} is not a diffusers model folder (no model_index.json).", file=sys.stderr)
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = prompts_spelled_out_by_caller(StableDiffusionPipeline.from_pretrained(
        args.model, dtype=torch.float16 if device == "cuda" else torch.float32
    ).to(device))
    try:
        bundled = {}
        if loras:
            bundled = apply_loras(pipe, loras)[1]
            print("LoRA: " + ", ".join(spec.describe() for spec in loras))
        for token, vectors in [*bundled.items(), *((token, read_embedding_file(path)) for path, token in embeddings)]:
            print(f"Embedding: {add_embedding(pipe, vectors, token)}")
    except LoraError as err:
        print(f"generate.py: {err}", file=sys.stderr)
        return err.exit_code
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = pipe(
        spell_out_vectors(args.prompt, token_groups(pipe.tokenizer)),  # an embedding's tokens, as training reads them
        height=size,
        width=size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator(device).manual_seed(args.seed),
    ).images[0]
    image.save(args.out)
    print(f"Wrote {Path(args.out).resolve()} ({size}x{size}, {args.prompt!r})")
    return 0


def parse_embedding(text: str) -> tuple[Path, str]:
    """`file[:token]` as (file, token), the file checked to hold one embedding (from its header); raises LoraError."""
    from common.safetensors_header import HeaderError, read_header

    name, token = split_suffix(text, "")
    path = Path(name)
    hint = "expected an embedding .safetensors file (e.g. a 'Saved embedding:' path of a train.py --embedding_token run)"
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        what = "no such file" if not path.exists() else "not a .safetensors file (pickled .pt/.bin files are not read)"
        raise LoraError(f"--embedding {text}: {what}; {hint}.")
    try:
        tensors = read_header(path).tensors
    except (HeaderError, OSError) as err:
        raise LoraError(f"--embedding {text}: cannot be read ({err}); {hint}.") from None
    if len(tensors) != 1:
        raise LoraError(f"--embedding {text} holds {len(tensors)} tensors, not one embedding; {hint} (a LoRA with "
                        "embeddings bundled goes to --lora).")
    return path, token or path.stem


def add_embedding(pipe, vectors, token: str) -> str:
    """`vectors` ([n, width]) into the pipeline's vocabulary as `token` (diffusers' load_textual_inversion: also
    token_1 ... token_{n-1}, which its pipelines spell out); returns what was added, or raises LoraError."""
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[-1] != width:
        raise LoraError(f"the embedding for {token!r} is {vectors.shape[-1]} wide and this model's text encoder "
                        f"{width} (SD1: 768, SD2: 1024); use an embedding made for this model's family.")
    if token in pipe.tokenizer.get_added_vocab():
        raise LoraError(f"an embedding named {token!r} was added already (by another --embedding, or bundled in a "
                        f"--lora file); give one of them another name: --embedding FILE:<{token}-2>.")
    if token in pipe.tokenizer.get_vocab():
        raise LoraError(f"{token!r} is a word this model's tokenizer already has, so an embedding cannot take its "
                        f"name; call it something new, such as --embedding FILE:<{token}>, and write that in the prompt.")
    pipe.load_textual_inversion(vectors.to(pipe.text_encoder.dtype), token=token)
    return f"{token!r} ({vectors.shape[0]} vector{'s' if vectors.shape[0] > 1 else ''})"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
