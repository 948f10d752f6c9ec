"""Command line: ``latentrt generate MODEL PROMPT``, ``latentrt info MODEL``, ``latentrt eval MODEL DATA``."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import LatentRTError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder, or builtin:recurrent / builtin:coconut")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    p.add_argument("--weights", default=None, help="weights file to use instead of the folder's (.safetensors/.pt)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentrt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text and print the recurrence steps per token")
    _add_model_args(g)
    g.add_argument("prompt", nargs="+", help="one or more prompts (several run as a batch)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--adaptive", action="store_true", help="exit the recurrence per token by --criterion")
    g.add_argument(
        "--criterion", default="kl", choices=["kl", "latent-diff", "entropy-diff", "argmax-stability", "cosine", "none"]
    )
    g.add_argument("--threshold", type=float, default=None, help="exit threshold (default per criterion)")
    g.add_argument("--steps", type=int, default=None, help="recurrence steps (the maximum when adaptive)")
    g.add_argument("--min-steps", type=int, default=0)
    g.add_argument("--kv", default="full", help="KV sharing across iterations: full | shared | ring-K")
    g.add_argument("--continuous", action="store_true", help="start each token's recurrence from the last state")
    g.add_argument("--init-scale", type=float, default=1.0)
    g.add_argument(
        "--thoughts",
        type=int,
        default=None,
        help="Coconut: append k continuous thoughts (default: the count the model was trained with, "
        "from its training.json, when the prompt has no latent markers)",
    )
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    g.add_argument("--json", action="store_true", help="print the result as JSON")

    i = sub.add_parser("info", help="print the config, parameter count and KV bytes per token")
    _add_model_args(i)
    i.add_argument("--steps", type=int, default=None, help="recurrence depth for the KV figures")

    e = sub.add_parser("eval", help="accuracy per difficulty on a JSON file of {question, steps, answer}")
    _add_model_args(e)
    e.add_argument("data", help="JSON list of {question, steps, answer} records")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    e.add_argument("--steps", type=int, default=None, help="recurrence steps (the maximum when adaptive)")
    e.add_argument("--adaptive", action="store_true")
    e.add_argument("--criterion", default="kl")
    e.add_argument("--threshold", type=float, default=None)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument(
        "--modes",
        default="coconut",
        help="Coconut: comma list of coconut, cot, nocot, pause (the "
        "prompt format; use each with a model trained that way)",
    )
    return parser


def _load(args):
    from .loader import load

    return load(args.model, device=args.device, dtype=args.dtype, backend=args.backend, weights=args.weights)


def cmd_generate(args) -> int:
    from .engine import generate

    model = _load(args)
    prompt = args.prompt[0] if len(args.prompt) == 1 else args.prompt
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if model.family == "recurrent":
        kwargs.update(
            adaptive=args.adaptive,
            exit_criterion=args.criterion,
            exit_threshold=args.threshold,
            num_steps=args.steps,
            min_steps=args.min_steps,
            kv_sharing=args.kv,
            continuous=args.continuous,
            init_scale=args.init_scale,
        )
    else:
        thoughts = args.thoughts
        if thoughts is None:
            from .evaluate import training_info

            info = training_info(model)
            if info.get("mode") in ("coconut", "pause"):
                thoughts = info["max_stage"] * info.get("thoughts_per_step", 1)
        kwargs.update(num_thoughts=thoughts)
    if args.stream:
        stream = generate(model, prompt, stream=True, **kwargs)
        for ev in stream:
            if isinstance(ev.tokens, list):
                print(" | ".join(repr(t) for t in (ev.text or ev.tokens)), flush=True)
            else:
                print(ev.text if ev.text is not None else ev.tokens, end="", flush=True)
        print()
        result = stream.result
    else:
        result = generate(model, prompt, **kwargs)
    if args.json:
        print(
            json.dumps(
                {
                    "tokens": result.tokens,
                    "steps": result.steps,
                    "text": result.text,
                    "kv_bytes": result.kv_bytes,
                    "finish_reasons": result.finish_reasons,
                }
            )
        )
        return 0
    texts = result.text if isinstance(result.text, list) else [result.text]
    steps = result.steps if prompt is args.prompt else [result.steps]
    for n, (text, st) in enumerate(zip(texts, steps)):
        head = f"[{n}] " if len(texts) > 1 else ""
        if not args.stream:
            print(f"{head}{text}")
        if model.family == "recurrent":
            mean = sum(st) / max(len(st), 1)
            print(f"{head}steps per token: {st} (mean {mean:.2f})")
    if model.family == "coconut":
        print(f"continuous thoughts: {result.num_thoughts}")
    print(f"KV cache: {result.kv_bytes / 2**20:.2f} MiB, backend {result.backend}")
    return 0


def cmd_info(args) -> int:
    from .cache import kv_bytes_per_token

    model = _load(args)
    cfg = model.config
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"model: {args.model} ({model.family}, model_type {cfg.model_type})")
    print(f"device: {model.device}, dtype: {str(model.dtype).replace('torch.', '')}")
    print(f"backend: {model.backend.name} ({model.backend.reason})")
    from .backends import availability

    for name, why in availability(model).items():
        print(f"  {name}: {why}")
    print(f"parameters: {n_params:,}")
    print("config:")
    for k, v in cfg.to_dict().items():
        print(f"  {k}: {v}")
    el = model.dtype.itemsize
    if model.family == "recurrent":
        r = args.steps or cfg.mean_recurrence
        plain = cfg.n_layers_in_prelude + cfg.n_layers_in_coda
        print(f"KV bytes per token (r={r}):")
        for mode, slots in (("full", r), ("ring-4", min(4, r)), ("shared", 1)):
            b = kv_bytes_per_token(
                plain, cfg.n_layers_in_recurrent_block, slots, cfg.num_key_value_heads, cfg.head_dim, el
            )
            print(f"  {mode:8s} {b:>12,d} B")
    else:
        b = kv_bytes_per_token(cfg.n_layer, 0, 1, cfg.n_head, cfg.head_dim, el)
        print(f"KV bytes per token: {b:,d} B")
        print(f"latent markers: start={cfg.start_latent_id} latent={cfg.latent_id} end={cfg.end_latent_id}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import run_eval

    return run_eval(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "info": cmd_info, "eval": cmd_eval}[args.command](args)
    except LatentRTError as exc:
        print(f"latentrt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
