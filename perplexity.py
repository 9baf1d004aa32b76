"""Perplexity of a long real text through every KV cache, against measured bits per channel.

The Pareto picture a practitioner wants: how much quality (perplexity) each cache configuration
costs for the memory it saves. The text is the interpreter's standard-library sources (the same
deterministic text as ``benchmarks/bench_cpu.py``), tokenized; its first ``--tokens`` tokens are
scored.

Procedure, per configuration: a fresh cache; the first ``--prompt`` tokens are the prompt (exact
attention inside the cache, as every cache's first step is); the rest is fed in chunks of
``--chunk`` tokens through the cache (teacher forcing; by the caches' semantics a chunk gives the
same logits as feeding its tokens one by one). Every token after the prompt is scored, the first
one from the prompt's last logit: ``PPL = exp(mean NLL)`` over ``tokens - prompt`` tokens.

Bits per channel are measured from the cache after the run (``models.memory_report``): key and
value bits of the compressed part, averaged over layers and over keys and values. Norms, scales
and mins are stored in the model's dtype, so a float32 run measures them at 32 bits (the
``nominal_kv_bits_fp16`` field gives the fp16-storage accounting of the same configuration).
Parts kept exact (the exact cache; values of the ``-v16`` configurations) count as 16 bits, the
fp16 baseline.

    python perplexity.py                                   # SmolLM2-135M, 4096 tokens, the default sweep
    python perplexity.py --methods exact qjl-paper 'kivi-*' --tokens 2048
    python perplexity.py --model /models/Llama-2-7b-hf --dtype float16

Writes ``<output>/perplexity.json`` after every configuration (a rerun with the same settings
skips the configurations already there) and ``<output>/perplexity.png``.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import models
from cli_io import check_output_paths, interruptible, write_json_atomic
from longbench_eval.records import DirectoryLock
from figures import save_figure
from models.accounting import FP16_BITS, qjl_bit_report
from models.config import QJLConfig
from real_text import stdlib_text

SKETCH_SIZES = (64, 128, 256, 512, 1024)
OUTLIERS = 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
JSON_NAME, FIGURE_NAME = "perplexity.json", "perplexity.png"
FORMAT_VERSION = 1

# family: label, color, marker
FAMILY_STYLE = {
    "exact": ("exact (fp16 = 16 bits)", "#ff3e30", "o"),
    "qjl-outliers": ("QJL, 8 outliers", "#107c10", "s"),
    "qjl-no-outliers": ("QJL, no outliers", "#7fcf6f", "D"),
    "qjl-exact-values": ("QJL, exact values", "#00796b", "P"),
    "kivi": ("KIVI", "#176bef", "^"),
}


# --- configurations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    """One named point of the sweep: a cache method and its settings (QJLConfig; for KIVI its
    ``value_quantization_bits``, ``group_size`` and ``buffer_size``; unused for exact)."""

    name: str
    method: str
    qjl: QJLConfig | None = None

    @property
    def family(self) -> str:
        if self.method != "qjl":
            return self.method
        if self.qjl.value_quantization_bits == 16:
            return "qjl-exact-values"
        outliers = self.qjl.outlier_count_general or self.qjl.outlier_count_initial_layers
        return "qjl-outliers" if outliers else "qjl-no-outliers"

    def settings(self) -> dict:
        """What the JSON records as this configuration's settings."""
        if self.method == "qjl":
            return self.qjl.to_dict()
        if self.method == "kivi":
            return {"bits": self.qjl.value_quantization_bits, "group_size": self.qjl.group_size,
                    "buffer_size": self.qjl.buffer_size}
        return {}

    def make_cache(self, model_config):
        return models.make_cache(self.method, model_config, self.qjl)


def qjl_sweep_config(m: int, outliers: int, value_bits: int, *, initial_layers_count: int, group_size: int,
                     buffer_size: int) -> QJLConfig:
    """Sketch size ``m`` on every layer; ``outliers`` outlier channels per group (0 = none) with
    ``m_o = min(m, 256)`` on general and ``min(m, 128)`` on initial layers (the paper's split)."""
    return QJLConfig(
        key_quantization_bits=m, key_quantization_bits_initial_layers=m, initial_layers_count=initial_layers_count,
        outlier_count_general=outliers, outlier_count_initial_layers=outliers,
        outlier_sketch_dim_general=min(m, 256) if outliers else 0,
        outlier_sketch_dim_initial_layers=min(m, 128) if outliers else 0,
        value_quantization_bits=value_bits, group_size=group_size, buffer_size=buffer_size,
    )  # fmt: skip


def default_sweep(num_layers: int, *, group_size: int = 32, buffer_size: int = 128) -> list[SweepConfig]:
    """The default sweep (18 configurations) for a model of ``num_layers`` layers:

    ``exact``; ``qjl-paper`` (the paper's configuration with its 15/32 initial-layer share scaled to
    the model); ``qjl-m{m}-o{8,0}-v2`` for m in 64..1024 (2-bit values, with / without outliers);
    ``qjl-m{256,1024}-o8-v{4,16}`` (4-bit and exact values); ``kivi-2``, ``kivi-4``.
    """
    paper = QJLConfig(group_size=group_size, buffer_size=buffer_size).scaled_to_layers(num_layers)
    shared = dict(initial_layers_count=paper.initial_layers_count, group_size=group_size, buffer_size=buffer_size)
    sweep = [SweepConfig("exact", "exact"), SweepConfig("qjl-paper", "qjl", paper)]
    for outliers in (OUTLIERS, 0):
        for m in SKETCH_SIZES:
            sweep.append(SweepConfig(f"qjl-m{m}-o{outliers}-v2", "qjl", qjl_sweep_config(m, outliers, 2, **shared)))
    for value_bits in (4, 16):
        for m in (256, 1024):
            sweep.append(SweepConfig(f"qjl-m{m}-o{OUTLIERS}-v{value_bits}", "qjl",
                                     qjl_sweep_config(m, OUTLIERS, value_bits, **shared)))
    for bits in (2, 4):
        kivi = QJLConfig(value_quantization_bits=bits, group_size=group_size, buffer_size=buffer_size)
        sweep.append(SweepConfig(f"kivi-{bits}", "kivi", kivi))
    return sweep


def select(sweep: list[SweepConfig], patterns: list[str] | None) -> list[SweepConfig]:
    """The configurations whose name matches one of ``patterns`` (names or shell-style patterns such
    as ``'qjl-m*-o0-v2'``), in sweep order; all of them for None. A pattern matching nothing is an
    error listing the names."""
    if not patterns:
        return list(sweep)
    names = [c.name for c in sweep]
    unknown = [p for p in patterns if not fnmatch.filter(names, p)]
    if unknown:
        raise ValueError(f"unknown configuration name(s) {unknown}; the sweep has: {', '.join(names)}")
    return [c for c in sweep if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


# --- text ---------------------------------------------------------------------------------------
def check_lengths(tokens: int, prompt: int, chunk: int) -> None:
    """ValueError unless ``0 < prompt < tokens`` and ``chunk > 0``."""
    for name, value in (("tokens", tokens), ("prompt", prompt), ("chunk", chunk)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if prompt <= 0:
        raise ValueError(f"prompt must be at least 1 token (the cache's exact first step), got {prompt}")
    if tokens <= prompt:
        raise ValueError(f"tokens ({tokens}) must exceed prompt ({prompt}): the tokens after the prompt are scored")
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")


def text_ids(tokenizer, tokens: int, chars_per_token: int = 6) -> torch.Tensor:
    """The first ``tokens`` token ids ``[1, tokens]`` of the standard-library text; ValueError when
    the whole text is shorter."""
    min_chars, previous = chars_per_token * tokens, -1
    while True:
        text = stdlib_text(min_chars)
        ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
        if ids.shape[1] >= tokens:
            return ids[:, :tokens]
        if len(text) == previous:  # the whole standard library is in
            raise ValueError(
                f"the standard-library text has only {ids.shape[1]} tokens with this tokenizer, fewer than "
                f"--tokens {tokens}"
            )
        previous, min_chars = len(text), 2 * max(min_chars, len(text))


def ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


# --- perplexity ---------------------------------------------------------------------------------
@dataclass
class Perplexity:
    """Per-token NLL (float64, ``tokens - prompt`` values, token ``prompt`` first) and its summary."""

    nll: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.nll.numel()

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)


def _as_batch(ids: torch.Tensor) -> torch.Tensor:
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be one sequence, shape [T] or [1, T], got {tuple(ids.shape)}")
    return ids


@torch.no_grad()
def perplexity_of(model, ids: torch.Tensor, cache, prompt: int, chunk: int) -> Perplexity:
    """NLL of every token of ``ids`` after the first ``prompt``, fed through ``cache``: the prompt as
    one step, then chunks of ``chunk`` tokens (teacher forcing). ``model`` should run the ``"qjl"``
    attention (``load_causal_lm`` loads it so) for compressed caches. The last token is fed too, so
    that the cache holds all ``ids`` afterwards (its logit predicts nothing)."""
    ids = _as_batch(ids)
    check_lengths(ids.shape[1], prompt, chunk)
    ids = ids.to(model.device)
    kwargs = models.cache_kwargs(model, cache)
    nll, previous = [], None  # previous: the logit row predicting the next fed token
    steps = [(0, prompt)] + [(s, min(s + chunk, ids.shape[1])) for s in range(prompt, ids.shape[1], chunk)]
    for start, end in steps:
        logits = model(input_ids=ids[:, start:end], use_cache=True, **kwargs).logits[0].float()
        if previous is not None:
            # the row before this step predicts its first token, the step's rows all but the last the rest
            rows = torch.cat([previous, logits[:-1]])
            nll.append(F.cross_entropy(rows, ids[0, start:end], reduction="none").double().cpu())
        previous = logits[-1:]
    return Perplexity(torch.cat(nll))


def full_forward_perplexity(model, ids: torch.Tensor, prompt: int) -> Perplexity:
    """The same NLL from one forward pass over all ``ids`` without a cache (a reference)."""
    ids = _as_batch(ids)
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), use_cache=False).logits[0].float()
    return Perplexity(F.cross_entropy(logits[prompt - 1:-1], ids[0, prompt:].to(logits.device),
                                      reduction="none").double().cpu())


# --- memory -------------------------------------------------------------------------------------
def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def memory_fields(config: SweepConfig, cache) -> dict:
    """Measured bits per channel (overall, keys, values) and bytes of ``cache`` after a run, and the
    configuration's nominal bits for an fp16 model (fp16 value scales / mins, float32 key norms)."""
    report = models.memory_report(cache)
    # the compressed layers' bits, as memory_report and longbench.py count them (exact sliding-window
    # layers are left out; a model with none compressed stores everything exactly: the fp16 baseline)
    compressed = [m for m in report.layers if m.compressed]
    if config.method == "exact" or not compressed:
        bits = dict(kv_bits_per_channel=float(FP16_BITS), key_bits_per_channel=float(FP16_BITS),
                    value_bits_per_channel=float(FP16_BITS), nominal_kv_bits_fp16=float(FP16_BITS))
    else:
        keys = [l.key_bits_per_channel for l in compressed]
        values = [l.value_bits_per_channel for l in compressed]
        if config.method == "qjl" and config.qjl.value_quantization_bits == 16:
            values = [float(FP16_BITS)] * len(values)  # exact values: the fp16 baseline
        measured = bool(keys) and None not in keys and None not in values
        key_bits, value_bits = (_mean(keys), _mean(values)) if measured else (None, None)
        if config.method == "qjl":
            nominal = qjl_bit_report(config.qjl, len(cache.layers), cache.head_dim).kv_bits_per_channel
        else:
            nominal = cache.nominal_bits_per_channel()
        bits = dict(
            # nothing compressed (all tokens within the buffer): the bits of what the report holds
            kv_bits_per_channel=(key_bits + value_bits) / 2 if measured else report.bits_per_channel,
            key_bits_per_channel=key_bits, value_bits_per_channel=value_bits, nominal_kv_bits_fp16=nominal,
        )
    return dict(bits, kv_bytes=report.nbytes, fp16_kv_bytes=report.fp16_nbytes)


def evaluate(model, ids: torch.Tensor, config: SweepConfig, prompt: int, chunk: int) -> dict:
    """One configuration: a fresh cache, the perplexity run, and the record of it."""
    cache = config.make_cache(model.config)
    start = time.perf_counter()
    result = perplexity_of(model, ids, cache, prompt, chunk)
    seconds = time.perf_counter() - start
    return dict(
        name=config.name, method=config.method, family=config.family, config=config.settings(),
        ppl=result.ppl, mean_nll=result.mean_nll, scored_tokens=result.tokens,
        **memory_fields(config, cache), seconds=seconds,
    )


# --- sweep with resume --------------------------------------------------------------------------
def differences(stored: dict, current: dict) -> list[str]:
    """``"key: <stored> there, <current> now"`` for every key whose values differ."""
    keys = sorted(set(stored) | set(current))
    return [f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now" for k in keys if stored.get(k) != current.get(k)]


def check_settings(stored: dict, current: dict, path) -> None:
    """ValueError naming every setting in which ``stored`` (from ``path``) and ``current`` differ."""
    diffs = differences(stored, current)
    if diffs:
        raise ValueError(
            f"{path} holds results of other settings ({'; '.join(diffs)}); refusing to mix them. "
            f"Use another --output directory or remove that file."
        )


def read_results(path: Path) -> dict | None:
    """The results document at ``path``, None when there is none; ValueError naming the file when it
    is not one (never overwritten: it may be someone's results)."""
    if not path.exists():
        return None
    keep = "refusing to overwrite it. Use another --output directory or move that file away."
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); {keep}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({e}); {keep}") from None
    if (not isinstance(data, dict) or not isinstance(data.get("settings"), dict)
            or not isinstance(data.get("results"), list)
            or not all(isinstance(r, dict) and "name" in r and "config" in r for r in data["results"])):
        raise ValueError(f"{path} is not a perplexity.py results file (no 'settings' / 'results'); {keep}")
    return data


def load_results(path: Path, settings: dict) -> dict:
    """The JSON at ``path`` when its settings equal ``settings``; a fresh document when absent."""
    data = read_results(path)
    if data is None:
        return dict(format=FORMAT_VERSION, settings=settings, results=[])
    check_settings(data["settings"], settings, path)
    return data


def check_stored_configs(data: dict, configs: list[SweepConfig], path) -> None:
    """ValueError when a configuration of ``configs`` is stored in ``data`` with other settings."""
    done = {r["name"]: r for r in data["results"]}
    for config in configs:
        diffs = differences(done[config.name]["config"], config.settings()) if config.name in done else []
        if diffs:
            raise ValueError(f"{path}: configuration {config.name!r} was run with other settings ({'; '.join(diffs)}); "
                             f"refusing to mix them. Use another --output directory or remove that file.")


def write_results(path: Path, data: dict) -> None:
    """Atomic write (an interrupt never leaves a truncated file)."""
    write_json_atomic(path, data, indent=1)


def run_sweep(model, ids: torch.Tensor, configs: list[SweepConfig], *, prompt: int, chunk: int, settings: dict,
              output: str | Path, progress: bool = True) -> dict:
    """Evaluate ``configs`` not yet in ``<output>/perplexity.json``, writing the file after each
    one. ``settings`` (model, text, lengths, ...) are stored there; a file of other settings is an
    error naming the difference, and a stored configuration of the same name but other settings too."""
    from tqdm import tqdm

    check_lengths(_as_batch(ids).shape[1], prompt, chunk)
    path = Path(output) / JSON_NAME
    data = load_results(path, settings)
    check_stored_configs(data, configs, path)
    done = {r["name"] for r in data["results"]}
    todo = [c for c in configs if c.name not in done]
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="configurations", unit="config",
               dynamic_ncols=True, disable=not progress)
    for config in todo:
        bar.set_postfix_str(config.name)
        record = evaluate(model, ids, config, prompt, chunk)
        data["results"].append(record)
        write_results(path, data)
        bar.write(format_row(record))
        bar.update()
    bar.close()
    if not path.exists():  # nothing to run: still leave the (empty) document
        write_results(path, data)
    return data


# --- output -------------------------------------------------------------------------------------
HEADER = f"{'configuration':18} {'PPL':>9} {'mean NLL':>9} {'tokens':>6} {'kv b/ch':>8} {'key':>7} {'value':>7} " \
         f"{'fp16 b/ch':>9} {'KV MB':>8} {'s':>7}"


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_row(r: dict) -> str:
    ppl = f"{r['ppl']:9.4f}" if r["ppl"] < 1e5 else f"{r['ppl']:9.3e}"
    return (f"{r['name']:18} {ppl:>9} {r['mean_nll']:9.5f} {r['scored_tokens']:6d} "
            f"{_fmt(r['kv_bits_per_channel'], '8.3f'):>8} {_fmt(r['key_bits_per_channel'], '7.3f'):>7} "
            f"{_fmt(r['value_bits_per_channel'], '7.3f'):>7} {_fmt(r['nominal_kv_bits_fp16'], '9.3f'):>9} "
            f"{r['kv_bytes'] / 2**20:8.2f} {r['seconds']:7.1f}")


def format_table(records: list[dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in records])


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the perplexity figure needs matplotlib: `pip install matplotlib`, or pass --no-figure"
        ) from None


def plot(data: dict, path: str | Path) -> Path:
    """PPL against measured bits per channel, one marker per configuration, colored by family;
    exact as a horizontal line."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = data["results"]
    settings = data["settings"]
    fig, ax = plt.subplots(figsize=(9, 6))
    for family, (label, color, marker) in FAMILY_STYLE.items():
        rows = [r for r in records if r["family"] == family]
        if not rows:
            continue
        ax.scatter([r["kv_bits_per_channel"] for r in rows], [r["ppl"] for r in rows], label=label, color=color,
                   marker=marker, s=55, zorder=3, edgecolors="black", linewidths=0.4)
        if family == "exact":
            ax.axhline(rows[0]["ppl"], color=color, linestyle="--", linewidth=1.2, zorder=2)
    # names above and below their markers in turn (left to right), so close neighbours stay readable
    ordered = sorted(records, key=lambda r: (r["kv_bits_per_channel"], r["ppl"]))
    for i, r in enumerate(ordered):
        ax.annotate(r["name"], (r["kv_bits_per_channel"], r["ppl"]), textcoords="offset points",
                    xytext=(4, 4 if i % 2 == 0 else -11), fontsize=7, color="#333333")
    ppls = [r["ppl"] for r in records if math.isfinite(r["ppl"])]
    if ppls and max(ppls) / min(ppls) > 3:
        ax.set_yscale("log")
    ax.set_xlabel("KV cache bits per channel (measured, compressed part; exact = 16)")
    ax.set_ylabel("perplexity")
    scored = settings["tokens"] - settings["prompt"]
    ax.set_title(f"{settings['model']}: perplexity over {scored} tokens ({settings['tokens']} tokens, "
                 f"first {settings['prompt']} as prompt, chunks of {settings['chunk']})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)


# --- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline SmolLM2-135M-Instruct) or any "
                                                       "transformers causal-LM path or hub name")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of text (prompt + scored)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (exact attention, not scored)")
    p.add_argument("--chunk", type=int, default=128, help="tokens per step after the prompt")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--methods", nargs="+", action="extend",  # a repeated flag adds to the list
                   help="configuration names or patterns (e.g. exact qjl-paper 'kivi-*'); default: the whole sweep")
    p.add_argument("--output", default="results/perplexity", help="directory of perplexity.json / .png")
    p.add_argument("--no-figure", action="store_true", help="skip the PNG (matplotlib not needed)")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_lengths(args.tokens, args.prompt, args.chunk)
    except ValueError as e:
        parser.error(str(e))
    if not args.no_figure:
        require_matplotlib()  # before the long sweep, not after it
    try:  # before loading the model (names do not depend on its depth)
        select(default_sweep(32), args.methods)
    except ValueError as e:
        parser.error(f"--methods: {e}")
    path = Path(args.output) / JSON_NAME
    settings = dict(  # what is known before the model loads; the text's digest and the depth come after
        model=args.model, dtype=args.dtype, tokens=args.tokens, prompt=args.prompt, chunk=args.chunk,
        text=f"python {sys.version_info.major}.{sys.version_info.minor} standard-library sources",
    )
    try:  # the output directory, and results already there (resumed only if of these settings), before the model
        check_output_paths(args.output, [JSON_NAME] + ([] if args.no_figure else [FIGURE_NAME]))
        stored = read_results(path)
        if stored is not None:
            check_settings({k: stored["settings"].get(k) for k in settings}, settings, path)
        # held for the whole run: a second run into this output would rewrite the results file from its
        # own copy and drop what this one finished meanwhile
        lock = DirectoryLock(Path(args.output)).acquire()
    except ValueError as e:
        parser.error(f"argument --output: {e}")
    try:
        return _run(parser, args, path, settings)
    finally:
        lock.release(remove=True)  # a directory this run made and left empty (a usage error) goes too


def _run(parser, args, path: Path, settings: dict) -> dict:
    """main's work once the output directory is checked and locked: the text, the model, the sweep."""
    from models.pretrained import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    try:  # the text before the model: a --tokens beyond it is a usage error, not a traceback minutes in
        ids = text_ids(tokenizer, args.tokens)
    except ValueError as e:
        parser.error(f"argument --tokens: {e}")
    model, _ = load_causal_lm(args.model, DTYPES[args.dtype], tokenizer=tokenizer)
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    configs = select(default_sweep(num_layers), args.methods)
    settings.update(ids_sha256=ids_digest(ids), num_layers=num_layers)
    try:  # the settings that need the model (other text, other depth), before any configuration runs
        check_stored_configs(load_results(path, settings), configs, path)
    except ValueError as e:
        parser.error(f"argument --output: {e}")
    print(f"{args.model} ({num_layers} layers, {args.dtype}, {torch.get_num_threads()} threads): "
          f"{args.tokens} tokens, prompt {args.prompt}, chunks of {args.chunk}; {len(configs)} configurations",
          flush=True)
    print(HEADER, flush=True)
    data = run_sweep(model, ids, configs, prompt=args.prompt, chunk=args.chunk, settings=settings,
                     output=args.output)
    print("\n" + format_table(data["results"]))
    print(f"results: {Path(args.output) / JSON_NAME}")
    if not args.no_figure:
        print(f"figure: {plot(data, Path(args.output) / FIGURE_NAME)}")
    return data


if __name__ == "__main__":
    sys.exit(interruptible(main, "the configurations finished so far are saved; the same command resumes"))
