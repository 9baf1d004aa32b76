"""Decode-time benchmark of the qjl CUDA and Triton ops against exact bf16 SDPA (a script, not a test).

Batch 1, 32 query heads, d = 128, paper configuration (m = 256, m_o = 256, 8 outliers per 32-token
group, 2-bit values in groups of 32), 8 and 32 KV heads, 4k..128k cached tokens. Times are CUDA
events around each call (synchronized), median of repeats; GB/s counts the bytes each op must read
(and write) once; "copy %" compares with a device-to-device copy measured here. Each op is measured
for every kernel backend that can run (CUDA extension built; Triton importable, compiled), one
table; `--backends` narrows it.

    python benchmarks/bench_ops.py [--tokens 4096,...] [--kv-heads 8,32] [--repeats 30] [--backends cuda,triton]
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from bench_gpu import timed  # this script's folder is on sys.path when it runs

D, Q_HEADS, M, M_O, N_OUT, GROUP, VALUE_BITS, VALUE_GROUP = 128, 32, 256, 256, 8, 32, 2, 32


def copy_bandwidth(repeats: int) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), repeats)


def state(kv_heads: int, tokens: int):
    groups = tokens // GROUP
    dev = "cuda"
    bits = torch.randint(0, 256, (1, kv_heads, groups, GROUP, M // 8), dtype=torch.uint8, device=dev)
    obits = torch.randint(0, 256, (1, kv_heads, groups, GROUP, M_O // 8), dtype=torch.uint8, device=dev)
    norms = torch.rand(1, kv_heads, groups, GROUP, device=dev, dtype=torch.bfloat16)
    onorms = torch.rand(1, kv_heads, groups, GROUP, device=dev, dtype=torch.bfloat16)
    idx = torch.rand(1, kv_heads, groups, D, device=dev).argsort(-1)[..., :N_OUT].to(torch.uint8)
    codes = torch.randint(-(2**31), 2**31 - 1, (1, kv_heads, tokens, D * VALUE_BITS // 32), dtype=torch.int32, device=dev)
    scales = torch.rand(1, kv_heads, tokens, D // VALUE_GROUP, device=dev, dtype=torch.bfloat16) * 0.1
    mins = -torch.rand(1, kv_heads, tokens, D // VALUE_GROUP, device=dev, dtype=torch.bfloat16)
    return (bits, obits, norms, onorms, idx), (codes, scales, mins)


def kernel_backends() -> dict[str, object]:
    """Kernel namespaces with the torch.ops.qjl signatures, by backend name, for those that can run."""
    from qjl_kernel import ops as qjl_ops
    from qjl_kernel import triton_ops

    found = {}
    if qjl_ops._cuda_ops() is not None:
        found["cuda"] = qjl_ops._CUDA_KERNELS
    if triton_ops.unavailable_reason(torch.device("cuda")) is None and not triton_ops.interpreted():
        found["triton"] = triton_ops
    return found


def run(kv_heads: int, tokens: int, repeats: int, copy_bw: float, backends: dict[str, object]) -> list[tuple]:
    keys, values = state(kv_heads, tokens)
    proj = torch.randn(M, D, device="cuda")
    query = torch.randn(1, Q_HEADS, 1, D, device="cuda", dtype=torch.bfloat16)
    weights = torch.rand(1, Q_HEADS, 1, tokens, device="cuda").softmax(-1)
    k_exact = torch.randn(1, kv_heads, tokens, D, device="cuda", dtype=torch.bfloat16)
    v_exact = torch.randn_like(k_exact)
    scale = 1 / math.sqrt(D)

    def exact():
        return F.scaled_dot_product_attention(query, k_exact, v_exact, enable_gqa=kv_heads != Q_HEADS)

    key_bytes = sum(t.numel() * t.element_size() for t in keys)
    value_bytes = sum(t.numel() * t.element_size() for t in values)
    score_bytes = Q_HEADS * tokens * 4
    work = []
    for backend, ops in backends.items():

        def scores(ops=ops):
            return ops.key_scores(query, *keys, proj)

        def matmul(ops=ops):
            return ops.value_matmul(weights, *values, VALUE_BITS, VALUE_GROUP)

        def decode(ops=ops):
            probs = torch.softmax(ops.key_scores(query, *keys, proj) * scale, dim=-1)
            return ops.value_matmul(probs, *values, VALUE_BITS, VALUE_GROUP)

        work += [
            (backend, "key_scores", scores, key_bytes + score_bytes),
            (backend, "value_matmul", matmul, value_bytes + weights.numel() * 4),
            (backend, "decode step", decode, key_bytes + value_bytes + 3 * score_bytes),
        ]
    t_exact = timed(exact, repeats)
    work.append(("torch", "exact SDPA", None, 2 * k_exact.numel() * k_exact.element_size()))
    rows = []
    for backend, name, fn, nbytes in work:
        t = t_exact if fn is None else timed(fn, repeats)
        gbs = nbytes / t / 1e9
        rows.append((kv_heads, tokens, backend, name, t * 1e6, gbs, 100 * gbs * 1e9 / copy_bw, t_exact / t))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--kv-heads", default="8,32")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--backends", default="cuda,triton", help="kernel backends to measure (those that can run)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_ops: no GPU visible; nothing to measure", file=sys.stderr)
        return 1
    import qjl_kernel

    info = qjl_kernel.backend_info()
    backends = {k: v for k, v in kernel_backends().items() if k in args.backends.split(",")}
    if not backends:
        print(f"bench_ops: no kernel backend among {args.backends} can run: {info}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(args.repeats)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, device copy {copy_bw / 1e9:.0f} GB/s "
          f"(read + write); m={M} m_o={M_O} outliers={N_OUT} group={GROUP}, values {VALUE_BITS}-bit/group {VALUE_GROUP}")
    print(f"# backends: {', '.join(backends)}; {info}")
    header = (f"{'kv_heads':>8} {'tokens':>7} {'backend':<7} {'op':<13} {'time_us':>9} {'GB/s':>7} {'copy %':>6} "
              f"{'vs exact':>8}")
    print(header)
    print("-" * len(header))
    for kv_heads in (int(h) for h in args.kv_heads.split(",")):
        for tokens in (int(t) for t in args.tokens.split(",")):
            for kv, t, backend, name, us, gbs, pct, speedup in run(kv_heads, tokens, args.repeats, copy_bw, backends):
                print(f"{kv:>8} {t:>7} {backend:<7} {name:<13} {us:>9.1f} {gbs:>7.0f} {pct:>6.0f} {speedup:>7.2f}x",
                      flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
