"""Compile the Triton kernels for a GPU that is not here and report what ptxas says of each.

No GPU is needed: the op wrappers of ``qjl_kernel/triton_ops.py`` (and the fused decode op of
``qjl_kernel/triton_decode.py`` when that module exists) are called on small CPU tensors with every
Triton launch captured instead of run, so each kernel is compiled with exactly the block sizes, warps
and specializations its wrapper picks for the shapes below. Each launch is then compiled ahead of time
for ``GPUTarget("cuda", ARCH, 32)`` (default sm_90), and ptxas ``-v`` (Triton's own ptxas, with the
flags Triton passes it) is run on the PTX. One row per kernel and configuration: registers per thread,
spill stores / loads (bytes per thread), stack frame and shared memory (bytes per program).

    python scripts/triton_static.py [--arch 90] [--json results.json] [--only key_scores]

Shapes (``CONFIGS``): the paper configuration at Llama-3-8B shapes (d = 128, m = 256, m_o = 256,
8 outliers, groups of 32 tokens, 32 query / 8 KV heads, bf16), its MHA variant (one query row per
KV head, the case that used to spill), GQA 8 (64 / 8 heads), d = 64 with m = 512, m_o = 128
(SmolLM2 shapes, 9 / 3 heads), and head dims 96 (GQA 8) and 256.
Exit status 1 when a kernel spills or fails to compile.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_static: unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# (name, head_dim, m, m_o, n_out, group, q_heads, kv_heads, query rows L, dtype)
CONFIGS = [
    ("paper-llama3", 128, 256, 256, 8, 32, 32, 8, 1, torch.bfloat16),
    ("paper-mha", 128, 256, 256, 8, 32, 8, 8, 1, torch.bfloat16),
    ("gqa8", 128, 256, 256, 8, 32, 64, 8, 1, torch.bfloat16),
    ("d64-m512", 64, 512, 128, 8, 32, 9, 3, 1, torch.bfloat16),
    ("d96-gqa8", 96, 256, 256, 8, 32, 64, 8, 1, torch.bfloat16),
    ("d256", 256, 256, 256, 8, 32, 32, 8, 1, torch.bfloat16),
]
VALUE_BITS, VALUE_GROUP, TOKENS = 2, 32, 1024

_TRITON_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
    torch.bool: "i1",
}


class Launch(types.SimpleNamespace):
    """One captured launch: the JITFunction, its positional/keyword arguments."""


def _signature(fn, args, kwargs):
    """Triton's signature / constexprs / attrs for these arguments, specialized as Triton's launcher
    does by default (ints equal to 1 become constants; pointers and ints divisible by 16 are marked so)."""
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = bound.get(name, param.default if hasattr(param, "default") else None)
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and i not in getattr(fn, "do_not_specialize", ()):
                signature[name], constexprs[(i,)] = "constexpr", 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name], constexprs[(i,)] = "constexpr", None
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name} = {value!r}")
    return signature, constexprs, attrs


@contextlib.contextmanager
def capture_launches(modules):
    """Every ``kernel[grid](...)`` records a Launch instead of running; GPU-only checks are bypassed."""
    import triton
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def run(self, *args, grid=None, warmup=False, **kwargs):
        launches.append(Launch(fn=self, args=args, kwargs=kwargs))

    saved = [(JITFunction, "run", JITFunction.run)]
    JITFunction.run = run
    for module in modules:
        if hasattr(module, "unavailable_reason"):
            saved.append((module, "unavailable_reason", module.unavailable_reason))
            module.unavailable_reason = lambda device: None
    props = types.SimpleNamespace(multi_processor_count=132, total_memory=141 << 30, major=9, minor=0,
                                  name="(static)", L2_cache_size=60 << 20)
    saved.append((torch.cuda, "get_device_properties", torch.cuda.get_device_properties))
    torch.cuda.get_device_properties = lambda *a, **k: props
    try:
        yield launches
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
    del triton


def _inputs(config):
    """Quantized key / value state on the CPU for one configuration."""
    from qjl_kernel import reference

    _, d, m, m_o, n_out, group, q_heads, kv_heads, length, dtype = config
    gen = torch.Generator().manual_seed(0)
    groups = TOKENS // group
    keys = torch.randn(1, kv_heads, groups, group, d, generator=gen).to(dtype)
    idx = torch.rand(1, kv_heads, groups, d, generator=gen).argsort(-1)[..., :n_out].to(torch.uint8)
    proj = torch.randn(m, d, generator=gen)
    state = reference.quantize_keys_ref(keys, idx, proj, m_o)
    values = torch.randn(1, kv_heads, TOKENS, d, generator=gen).to(dtype)
    vstate = reference.quantize_values_ref(values, VALUE_GROUP, VALUE_BITS)
    query = torch.randn(1, q_heads, length, d, generator=gen).to(dtype)
    return keys, idx, proj, state, values, vstate, query


def triton_ops_launches(config, triton_ops):
    keys, idx, proj, state, values, vstate, query = _inputs(config)
    m_o = state.outlier_bits.shape[-1] * 8
    weights = torch.rand(*query.shape[:3], TOKENS).softmax(-1)
    with capture_launches([triton_ops]) as launches:
        triton_ops.quantize_keys(keys, idx, proj, m_o)
        triton_ops.key_scores(query, *state, proj)
        triton_ops.quantize_values(values, VALUE_GROUP, VALUE_BITS)
        triton_ops.value_matmul(weights, vstate.codes, vstate.scales, vstate.mins, VALUE_BITS, VALUE_GROUP)
    return launches


def decode_launches(config, triton_ops, triton_decode):
    """Launches of the fused Triton decode op, through the public ``decode_attention`` with the
    Triton backend forced (its wrapper decides the kernels and their constants)."""
    import qjl_kernel

    keys, idx, proj, state, values, vstate, query = _inputs(config)
    kv_heads, d = keys.shape[1], keys.shape[-1]
    residual = torch.randn(1, kv_heads, 7, d).to(query.dtype)
    window = torch.randn(1, kv_heads, 7, d).to(query.dtype)
    with capture_launches([triton_ops, triton_decode]) as launches, qjl_kernel.use_backend("triton"):
        qjl_kernel.decode_attention(query, state, proj, residual, vstate, window)
    return [launch for launch in launches if launch.fn.fn.__module__ == triton_decode.__name__
            or launch.fn.fn.__globals__ is vars(triton_decode)]


_PTXAS_LINE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_path(capability: int) -> str:
    """The ptxas Triton itself uses (its API moved between releases; the bundled binary as a last resort)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return get_ptxas(capability).path
        except TypeError:  # older Triton: no arch argument
            return get_ptxas().path
    except (ImportError, AttributeError):
        pass
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except (ImportError, AttributeError):
        import triton

        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def ptxas_report(ptx: str, arch: str, fp_fusion: bool) -> dict:
    """ptxas -v of the PTX with Triton's flags: registers, stack, spill bytes."""
    import tempfile

    ptxas = _ptxas_path(int(re.sub(r"\D", "", arch)))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        base = [ptxas, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", f"--gpu-name={arch}",
                str(src), "-o", str(Path(tmp, "k.o"))]
        proc = subprocess.run(base[:1] + ["--regAllocOptLevel=2"] + base[1:], capture_output=True, text=True)
        if proc.returncode != 0:  # older ptxas without the flag Triton 3.8 passes
            proc = subprocess.run(base, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    report = {}
    for key, pattern in _PTXAS_LINE.items():
        found = pattern.findall(proc.stderr)
        report[key] = max(int(x) for x in found) if found else 0
    return report


def compile_launch(launch: Launch, capability: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, kwargs = launch.fn, launch.kwargs
    signature, constexprs, attrs = _signature(fn, launch.args, kwargs)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg") if k in kwargs}
    src = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    report = ptxas_report(compiled.asm["ptx"], arch, options.get("enable_fp_fusion", True))
    report["shared"] = compiled.metadata.shared
    report["warps"] = compiled.metadata.num_warps
    blocks = {k: v for k, v in zip(fn.arg_names, (constexprs.get((i,)) for i in range(len(fn.arg_names))))
              if k.startswith("BLOCK") and v is not None}
    report["blocks"] = " ".join(f"{k[6:]}={v}" for k, v in blocks.items())
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number (90 = sm_90)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--only", default="", help="comma-separated substrings of kernel names to keep")
    args = parser.parse_args()
    try:
        import triton
    except Exception as exc:
        print(f"triton_static: triton is not importable ({type(exc).__name__}: {exc})")
        return 1
    from qjl_kernel import triton_ops

    try:
        triton_decode = importlib.import_module("qjl_kernel.triton_decode")
    except ModuleNotFoundError:
        triton_decode = None
    print(f"# triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch} (compiled here, "
          f"no GPU needed); spills in bytes per thread, shared in bytes per program")
    if triton_decode is None:
        print("# qjl_kernel/triton_decode.py not found: its kernels are not reported")
    only = [s for s in args.only.split(",") if s]
    header = f"{'config':<13} {'kernel':<28} {'blocks':<46} {'warps':>5} {'regs':>4} {'spill st':>8} " \
             f"{'spill ld':>8} {'stack':>6} {'shared':>7}"
    print(header)
    print("-" * len(header))
    rows, bad = [], 0
    for config in CONFIGS:
        launches = triton_ops_launches(config, triton_ops)
        if triton_decode is not None:
            try:
                found = decode_launches(config, triton_ops, triton_decode)
            except Exception as exc:  # its API is not ours: report, go on
                message = " ".join(str(exc).split())
                print(f"{config[0]:<13} triton_decode: no launch captured ({type(exc).__name__}: {message[:400]})")
                found = []
            else:
                if not found:
                    print(f"{config[0]:<13} triton_decode: decode_attention launched none of its kernels on "
                          "CPU tensors with the Triton backend forced")
            launches += found
        for launch in launches:
            name = launch.fn.fn.__name__ if hasattr(launch.fn, "fn") else launch.fn.__name__
            if only and not any(s in name for s in only):
                continue
            try:
                r = compile_launch(launch, args.arch)
            except Exception as exc:
                bad += 1
                message = " ".join(str(exc).split())  # one line: the table stays readable
                print(f"{config[0]:<13} {name:<28} COMPILE FAILED: {type(exc).__name__}: {message[:400]}")
                continue
            rows.append(dict(config=config[0], kernel=name, **r))
            bad += bool(r["spill_stores"] or r["spill_loads"])
            print(f"{config[0]:<13} {name:<28} {r['blocks']:<46} {r['warps']:>5} {r['regs']:>4} "
                  f"{r['spill_stores']:>8} {r['spill_loads']:>8} {r['stack']:>6} {r['shared']:>7}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
