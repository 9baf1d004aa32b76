"""One decode step on a GPU: the fused QJL op against exact bf16 attention (a script, not a test).

Llama-3-8B attention shapes (32 query heads, 8 KV heads, d = 128, batch 1, one query row), bf16, the
paper configuration (m = 256, m_o = 256, 8 outliers per 32-token group; 2-bit values in groups of 32),
RESIDUAL exact keys / values at the end, 8k..128k tokens in all. Rows:

- ``exact SDPA``: ``F.scaled_dot_product_attention`` over bf16 K/V with ``enable_gqa`` (the baseline);
- ``decode``: ``qjl_kernel.decode_attention`` with each kernel backend that can run (``cuda``,
  ``triton``), whatever it dispatches to (fused kernels where built, else composed ops);
- ``key_scores``: the key-score op alone, with its bandwidth: bytes it must move (sign bits, norms,
  indices read, float32 scores written) per second, and as % of the speed of a device-to-device copy
  of the same number of bytes, timed the same way.

Times are medians of CUDA-event intervals after warm-up. ``graph_us`` replays the call captured in a
CUDA graph (device time, no Python or launch overhead; "-" when capture fails), ``eager_us`` is the
plain call from Python (what an uncaptured decode loop pays). "vs SDPA" compares like with like.

    python benchmarks/bench_gpu.py [--tokens 8192,...] [--repeats 20] [--backends cuda,triton]
    python benchmarks/bench_gpu.py --edge-cases   # small odd shapes against the reference (for memcheck)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Q_HEADS, KV_HEADS, D, M, M_O, N_OUT, GROUP, VALUE_BITS, VALUE_GROUP = 32, 8, 128, 256, 256, 8, 32, 2, 32
RESIDUAL = 32  # exact keys / values after the compressed tokens
GRAPH_CALLS = 10  # calls per captured graph (its launch cost spread over them)


def timed(fn, repeats: int, warmup: int = 5) -> float:
    """Median seconds of one fn() over repeats: CUDA events around each call, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def graph_timed(fn, repeats: int) -> float | None:
    """Median seconds of one fn() replayed from a CUDA graph of GRAPH_CALLS calls; None when the call
    cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles, allocator pools) outside the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
    except Exception as exc:  # noqa: BLE001  (reported as "-")
        print(f"# graph capture failed: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
        torch.cuda.synchronize()
        return None
    return timed(graph.replay, repeats, warmup=2) / GRAPH_CALLS


def copy_seconds(nbytes: int, repeats: int) -> float:
    """Device-to-device copy moving nbytes in all (half read, half written), timed as the ops are."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = graph_timed(lambda: dst.copy_(src), repeats)
    return t if t is not None else timed(lambda: dst.copy_(src), repeats)


def qjl_state(tokens: int, residual: int, dtype=torch.bfloat16, gen=None):
    """Random compressed state of a layer holding ``tokens`` tokens, the last ``residual`` exact."""
    from qjl_kernel import QuantizedKeys, QuantizedValues

    dev = "cuda"
    committed = tokens - residual
    groups = committed // GROUP
    assert groups * GROUP == committed, "tokens - residual must be a multiple of the group size"
    bits = torch.randint(0, 256, (1, KV_HEADS, groups, GROUP, M // 8), dtype=torch.uint8, device=dev, generator=gen)
    obits = torch.randint(0, 256, (1, KV_HEADS, groups, GROUP, M_O // 8), dtype=torch.uint8, device=dev, generator=gen)
    norms = torch.rand(1, KV_HEADS, groups, GROUP, device=dev, generator=gen).to(dtype) * 4
    onorms = torch.rand(1, KV_HEADS, groups, GROUP, device=dev, generator=gen).to(dtype) * 8
    idx = torch.rand(1, KV_HEADS, groups, D, device=dev, generator=gen).argsort(-1)[..., :N_OUT].to(torch.uint8)
    keys = QuantizedKeys(bits, obits, norms, onorms, idx)
    words = D * VALUE_BITS // 32
    codes = torch.randint(-(2**31), 2**31 - 1, (1, KV_HEADS, committed, words), dtype=torch.int32, device=dev,
                          generator=gen)
    scales = (torch.rand(1, KV_HEADS, committed, D // VALUE_GROUP, device=dev, generator=gen) * 0.1).to(dtype)
    mins = (-torch.rand(1, KV_HEADS, committed, D // VALUE_GROUP, device=dev, generator=gen)).to(dtype)
    values = QuantizedValues(codes, scales, mins, VALUE_BITS, VALUE_GROUP)
    residual_keys = torch.randn(1, KV_HEADS, residual, D, device=dev, generator=gen).to(dtype)
    window = torch.randn(1, KV_HEADS, residual, D, device=dev, generator=gen).to(dtype)
    return keys, values, residual_keys, window


def kernel_backends(wanted: list[str], device: str = "cuda") -> dict[str, str]:
    """Backends among ``wanted`` that run on ``device`` tensors here -> "" (or why not)."""
    import qjl_kernel

    probe = torch.zeros(1, device=device)
    found = {}
    for name in wanted:
        try:
            with qjl_kernel.use_backend(name):
                qjl_kernel.backend_for(probe)
            found[name] = ""
        except RuntimeError as exc:
            found[name] = str(exc)
    return found


def bench(tokens_list: list[int], repeats: int, backends: list[str]) -> list[dict]:
    import qjl_kernel

    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    runnable = kernel_backends(backends, device)
    for name, why in runnable.items():
        if why:
            print(f"# backend {name}: not measured ({why})")
    runnable = [name for name, why in runnable.items() if not why]
    proj = torch.randn(M, D, device=device, generator=gen)
    query = torch.randn(1, Q_HEADS, 1, D, device=device, generator=gen).to(torch.bfloat16)
    rows = []
    for tokens in tokens_list:
        keys, values, residual_keys, window = qjl_state(tokens, RESIDUAL, gen=gen)
        k_exact = torch.randn(1, KV_HEADS, tokens, D, device=device, generator=gen).to(torch.bfloat16)
        v_exact = torch.randn_like(k_exact)

        def exact():
            return F.scaled_dot_product_attention(query, k_exact, v_exact, enable_gqa=True)

        sdpa = (graph_timed(exact, repeats), timed(exact, repeats))
        rows.append(dict(tokens=tokens, backend="torch", op="exact SDPA", graph=sdpa[0], eager=sdpa[1]))
        del k_exact, v_exact
        score_bytes = keys.nbytes() + Q_HEADS * keys.num_tokens * 4
        copy_t = copy_seconds(score_bytes, repeats)
        for name in runnable:

            def decode(name=name):
                with qjl_kernel.use_backend(name):
                    return qjl_kernel.decode_attention(query, keys, proj, residual_keys, values, window)

            def scores(name=name):
                with qjl_kernel.use_backend(name):
                    return qjl_kernel.key_scores(query, keys, proj)

            for op, fn in (("decode", decode), ("key_scores", scores)):
                try:
                    row = dict(tokens=tokens, backend=name, op=op, graph=graph_timed(fn, repeats),
                               eager=timed(fn, repeats))
                except Exception as exc:  # noqa: BLE001  (one failing backend must not hide the others)
                    print(f"# {name} {op} at {tokens} tokens failed: {type(exc).__name__}: {str(exc)[:200]}")
                    torch.cuda.synchronize()
                    continue
                for key in ("graph", "eager"):
                    base = sdpa[0] if key == "graph" else sdpa[1]
                    row[f"vs_{key}"] = base / row[key] if row[key] and base and op == "decode" else None
                if op == "key_scores":
                    t = row["graph"] or row["eager"]
                    row["gbs"] = score_bytes / t / 1e9
                    row["copy_pct"] = 100 * copy_t / t
                rows.append(row)
        del keys, values, residual_keys, window
        torch.cuda.empty_cache()
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = (f"{'tokens':>7} {'backend':<7} {'op':<11} {'graph_us':>9} {'eager_us':>9} {'vs SDPA':>8} "
              f"{'(eager)':>8} {'GB/s':>6} {'copy %':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        vs = r.get("vs_graph")
        vs_e = r.get("vs_eager")
        print(f"{r['tokens']:>7} {r['backend']:<7} {r['op']:<11} {_fmt(r['graph'] and r['graph'] * 1e6, '9.1f')} "
              f"{_fmt(r['eager'] * 1e6, '9.1f'):>9} {_fmt(vs, '7.2f') + ('x' if vs else ''):>8} "
              f"{_fmt(vs_e, '7.2f') + ('x' if vs_e else ''):>8} {_fmt(r.get('gbs'), '6.0f'):>6} "
              f"{_fmt(r.get('copy_pct'), '6.0f'):>6}", flush=True)


# --------------------------------------------------------------------------------------------------
# Edge cases: small odd shapes through every kernel backend, against the reference. Run under
# compute-sanitizer (memcheck) by scripts/gpu_check.sh; a wrong answer or an exception exits 1.
# --------------------------------------------------------------------------------------------------

# (name, batch, head_dim, m, m_o, n_out, group, n_groups, residual keys, quantized values, padded tokens)
EDGE_CASES = [
    ("m_o=0, one token", 1, 128, 256, 0, 0, 1, 1, 0, 1, 0),
    ("d=96, 109 tokens (3 groups + 13)", 1, 96, 128, 64, 4, 32, 3, 13, 100, 0),
    ("batch 2, padding mask", 2, 128, 256, 256, 8, 32, 2, 5, 64, 20),
]


def edge_case_inputs(case, dtype=torch.float32, device="cuda"):
    from qjl_kernel import reference

    _, batch, d, m, m_o, n_out, group, n_groups, residual, quantized, padded = case
    gen = torch.Generator(device=device).manual_seed(1)
    kv_heads, q_heads = 2, 8
    tokens = group * n_groups + residual
    keys = torch.randn(batch, kv_heads, n_groups, group, d, device=device, generator=gen).to(dtype)
    idx = torch.rand(batch, kv_heads, n_groups, d, device=device, generator=gen).argsort(-1)[..., :n_out]
    proj = torch.randn(m, d, device=device, generator=gen)
    state = reference.quantize_keys_ref(keys, idx.to(torch.uint8), proj, m_o)
    all_values = torch.randn(batch, kv_heads, tokens, d, device=device, generator=gen).to(dtype)
    values = reference.quantize_values_ref(all_values[:, :, :quantized].contiguous(), 32, 2)
    window = all_values[:, :, quantized:].contiguous()
    residual_keys = torch.randn(batch, kv_heads, residual, d, device=device, generator=gen).to(dtype)
    query = torch.randn(batch, q_heads, 1, d, device=device, generator=gen).to(dtype)
    mask = None
    if padded:
        mask = torch.ones(batch, 1, tokens, dtype=torch.bool, device=device)
        mask[0, :, :padded] = False  # the first sequence is left-padded
    return query, state, proj, residual_keys, values, window, mask


def run_edge_cases(backends: list[str], device: str = "cuda") -> int:
    import qjl_kernel
    from qjl_kernel import reference

    failures = 0
    runnable = kernel_backends(backends, device)
    for name, why in runnable.items():
        if why:
            print(f"edge cases: backend {name} skipped ({why})")
    for case in EDGE_CASES:
        query, state, proj, residual_keys, values, window, mask = edge_case_inputs(case, device=device)
        scaling = query.shape[-1] ** -0.5
        want_out = reference.decode_attention_ref(query, state, proj, residual_keys, values, window, mask, scaling)
        want_scores = reference.key_scores_ref(query, state, proj)
        for name in (n for n, why in runnable.items() if not why):
            try:
                with qjl_kernel.use_backend(name):
                    out = qjl_kernel.decode_attention(query, state, proj, residual_keys, values, window, mask)
                    scores = qjl_kernel.key_scores(query, state, proj)
                if device == "cuda":
                    torch.cuda.synchronize()
                err_out = (out - want_out).abs().max().item()
                err_scores = ((scores - want_scores).abs().max() / want_scores.abs().max().clamp_min(1e-6)).item()
                ok = err_out <= 1e-3 and err_scores <= 1e-4 and bool(torch.isfinite(out).all())
            except Exception as exc:  # noqa: BLE001  (reported per case)
                print(f"edge case {case[0]!r} {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                failures += 1
                continue
            failures += not ok
            print(f"edge case {case[0]!r} {name}: {'ok' if ok else 'MISMATCH'} (decode max |err| {err_out:.2e}, "
                  f"scores max rel err {err_scores:.2e})", flush=True)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="8192,16384,32768,65536,131072")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backends", default="cuda,triton", help="kernel backends to measure (those that can run)")
    parser.add_argument("--edge-cases", action="store_true", help="run the edge cases against the reference instead")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no GPU visible to torch; nothing to measure", file=sys.stderr)
        return 1
    backends = [b for b in args.backends.split(",") if b]
    if args.edge_cases:
        return run_edge_cases(backends)
    import qjl_kernel

    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {qjl_kernel.backend_info()}")
    print(f"# {Q_HEADS}/{KV_HEADS} heads, d={D}, bf16, m={M} m_o={M_O} outliers={N_OUT} group={GROUP}, values "
          f"{VALUE_BITS}-bit/group {VALUE_GROUP}, {RESIDUAL} exact tokens; medians of {args.repeats}")
    rows = bench([int(t) for t in args.tokens.split(",")], args.repeats, backends)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
