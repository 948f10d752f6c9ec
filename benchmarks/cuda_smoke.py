"""A small run of every CUDA building block, for compute-sanitizer (memcheck, racecheck) in gpu_check.sh."""

import torch

from latentrt import cuda_ext


def main() -> None:
    ok, why = cuda_ext.available()
    if not ok:
        raise SystemExit(f"cuda extension unavailable: {why}")
    x = torch.randn(3, 256, device="cuda").bfloat16()
    w = torch.randn(96, 256, device="cuda").bfloat16()
    cuda_ext.gemv_bf16(x, w, torch.randn(3, 96, device="cuda").bfloat16())
    from kernels import decode_attention as da

    q, ks, vs, written, valid, slot = da.make_inputs("tiny", "cuda", torch.bfloat16, batch=2, context=40, slots=3)
    cuda_ext.decode_attention_bf16(q, ks, vs, written, valid, slot, 40)
    persistent_loop()
    thought_loop()
    torch.cuda.synchronize()
    print("cuda smoke ok")


def persistent_loop() -> None:
    """A few tokens of a small bf16 model through the persistent kernel: both barriers, three criteria."""
    import latentrt
    from latentrt.backends import get_backend
    from latentrt.config import parse_config
    from latentrt.models import build_model

    cfg = parse_config(
        dict(
            model_type="huginn_raven",
            n_embd=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=64,
            block_size=64,
            n_layers_in_prelude=1,
            n_layers_in_recurrent_block=2,
            n_layers_in_coda=1,
            mean_recurrence=4,
        )
    )
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    for mode in (0, 1):
        model.backend = get_backend("cuda", model)
        model.backend.barrier_mode = mode
        for crit in ("none", "latent-diff", "kl"):
            latentrt.generate(
                model,
                [[3, 4, 5], [6, 7]],
                max_new_tokens=3,
                num_steps=4,
                kv_sharing="ring-2",
                adaptive=True,
                exit_criterion=crit,
            )


def thought_loop() -> None:
    """Coconut thoughts of a small bf16 GPT-2 in one launch, both barriers."""
    import latentrt
    from latentrt.backends import get_backend
    from latentrt.config import parse_config
    from latentrt.models import build_model

    cfg = parse_config(
        dict(
            model_type="gpt2",
            n_embd=64,
            n_head=2,
            n_layer=2,
            n_positions=64,
            vocab_size=64,
            latent_id=63,
            start_latent_id=62,
            end_latent_id=61,
        )
    )
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    for mode in (0, 1):
        model.backend = get_backend("cuda", model)
        model.backend.barrier_mode = mode
        latentrt.generate(model, [[3, 4, 62, 63, 63, 63, 61], [5, 6, 62, 63, 63, 63, 61]], max_new_tokens=2)


if __name__ == "__main__":
    main()
