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
    torch.cuda.synchronize()
    print("cuda smoke ok")


if __name__ == "__main__":
    main()
