"""Train the tiny Llama on the synthetic retrieval tasks, on one CPU thread.

    OMP_NUM_THREADS=1 nohup .venv/bin/python -m tinylm.train --run_dir tinylm/runs/main \\
        --export tinylm/model > tinylm/runs/main.log 2>&1 &

What makes a model this small learn retrieval in under an hour of CPU:

- a length curriculum (``--stages``): induction ("find the digit after the one I just wrote")
  is learned on 80-256-token prompts, then the length grows to beyond the longest shipped one;
- the loss covers only the answer (the word marker, the number, the period and EOS, so the
  model learns to stop) and the needle's restatement of its number (:func:`restatement_targets`);
- key/value noise augmentation from ``--noise_start`` on: Gaussian noise of a random relative
  norm (up to ``--key_noise`` / ``--value_noise``) on the keys and values of every attention
  layer, only at positions older than the last ``--exact_window`` prompt tokens (where a
  quantized cache keeps keys exact). Score noise of a QJL sketch with m bits is about
  ``0.05-0.08 * |q| |k|`` at m = 256, i.e. isotropic key noise of relative norm ~0.5-0.9 at
  head_dim 128; training through such noise forces retrieval with wide score margins, as large
  models have. Nothing of QJL itself is used in training.

Progress goes to stdout, ``<run_dir>/history.json`` (held-out greedy exact match, teacher
forced, per task and length, with and without key noise) and ``<run_dir>/checkpoint.pt``
(resumable with ``--resume``; without it, a ``run_dir`` that holds a run is refused rather than
replaced). With ``--export DIR`` the final model, tokenizer and generation
config are written to DIR (``from_pretrained``-loadable) and the curve to ``DIR/../training_curve.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import synthetic_tasks
from cli_io import (
    fraction_float,
    non_negative_float,
    non_negative_int,
    numpy_torch_seed_int,
    positive_float,
    positive_int,
    require_output_paths,
    write_json_atomic,
)
from tinylm.tokenizer import WORD_START, build_tokenizer

EVAL_LENGTHS = (512, 1024, 2048)
EVAL_SEED = 10_000  # training examples come from --seed streams, held-out ones from this one


def parse_stages(text: str) -> list[tuple[float, int, int]]:
    """``"0.15:80:256,0.2:128:768,..."`` -> cumulative ``(end_fraction, min_len, max_len)``;
    ValueError saying what is wrong with ``text``."""
    stages, end = [], 0.0
    for item in text.split(","):
        try:
            frac, lo, hi = item.split(":")
            frac, lo, hi = float(frac), int(lo), int(hi)
        except ValueError:
            raise ValueError(f"each stage is fraction:min_len:max_len (e.g. 0.3:96:192), got {item!r}") from None
        if not (math.isfinite(frac) and frac > 0) or not 0 < lo <= hi:
            raise ValueError(f"stage {item!r} needs a fraction > 0 and lengths 0 < min_len <= max_len")
        end += frac
        stages.append((end, lo, hi))
    if abs(end - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {end:g}")
    stages[-1] = (1.0, *stages[-1][1:])  # so that every step / steps < 1 finds its stage despite rounding
    return stages


def stages_arg(text: str) -> str:
    """argparse type of ``--stages``: :func:`parse_stages` accepts it and every stage's shortest
    prompt fits each task's needles and question (a task's fixed part does not depend on the draw).
    The text itself is kept, as args.json and the checkpoint record it."""
    try:
        tables = synthetic_tasks.load_table("dataset2prompt")
        for lo in sorted({lo for _, lo, _ in parse_stages(text)}):
            for task in synthetic_tasks.TASKS:
                synthetic_tasks.make_example(task, np.random.default_rng(0), lo, tables[task])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def model_config(args, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=128,  # QJL's kernels and the paper assume 128
        max_position_embeddings=4096,
        rope_theta=10_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def encode_example(tokenizer, record: dict, prompt_format: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer (" 407." then EOS) and the prompt's length: the answer
    targets are the ids from that position on."""
    prompt = tokenizer(prompt_format.format(**record)).input_ids
    answer = tokenizer(f" {record['answers'][0]}.", add_special_tokens=False).input_ids
    return prompt + answer + [tokenizer.eos_token_id], len(prompt)


def restatement_targets(tokenizer, ids: list[int]) -> list[int]:
    """Positions of the second statement of each number in a prompt ("... 407. Remember it. 407
    is ..."): the word marker and the number. Predicting them is the retrieval skill at short
    range, an extra signal that makes the skill appear early; the answer needs it at long range."""
    marker = tokenizer.convert_tokens_to_ids(WORD_START)
    digits = set(tokenizer.convert_tokens_to_ids(list(synthetic_tasks.NUMBERS)))
    seen, targets, i = set(), [], 0
    while i < len(ids):
        if ids[i] == marker and i + 1 < len(ids) and ids[i + 1] in digits:
            j = i + 1
            while j < len(ids) and ids[j] in digits:
                j += 1
            number = tuple(ids[i + 1 : j])
            if number in seen:
                targets.extend(range(i, j))
            seen.add(number)
            i = j
        else:
            i += 1
    return targets


class KVNoise:
    """Forward hooks adding Gaussian noise of relative norm ``r`` (per sequence) to each key and
    value head vector at masked positions (k_proj / v_proj outputs: RoPE is a rotation, so noise
    before it is distributed like noise after it)."""

    def __init__(self, model: LlamaForCausalLM):
        self.head_dim = model.config.head_dim
        self.mask = None  # [B, T] bool: positions to perturb
        self.key_r = self.value_r = None  # [B] relative norms
        for layer in model.model.layers:
            layer.self_attn.k_proj.register_forward_hook(lambda m, i, out: self._perturb(out, self.key_r))
            layer.self_attn.v_proj.register_forward_hook(lambda m, i, out: self._perturb(out, self.value_r))

    def set(self, mask=None, key_r=None, value_r=None):
        self.mask, self.key_r, self.value_r = mask, key_r, value_r

    def _perturb(self, out: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        if self.mask is None or r is None:
            return out
        b, t, _ = out.shape
        x = out.view(b, t, -1, self.head_dim)
        noise = torch.randn_like(x)
        noise = noise * (x.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True))
        scale = (r.view(b, 1, 1, 1) * self.mask.view(b, t, 1, 1)).to(x.dtype)
        return (x + scale * noise).view(b, t, -1)


def pad_batch(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    # Right padding: under causal attention it never affects the real positions.
    x = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        x[i, : len(s)] = torch.tensor(s)
    return x


def far_mask(prompt_lens: list[int], total: int, exact_window: int) -> torch.Tensor:
    """[B, T] True at positions older than the last ``exact_window`` prompt tokens."""
    pos = torch.arange(total)
    return pos.unsqueeze(0) < (torch.tensor(prompt_lens) - exact_window).unsqueeze(1)


def build_eval_set(tokenizer, tables, n: int) -> dict[str, list[tuple[list[int], int]]]:
    out = {}
    for task in synthetic_tasks.TASKS:
        records = synthetic_tasks.generate(task, n * len(EVAL_LENGTHS), EVAL_LENGTHS, seed=EVAL_SEED)
        for length in EVAL_LENGTHS:
            out[f"{task}@{length}"] = [
                encode_example(tokenizer, r, tables[task]) for r in records if r["_id"].endswith(f"L{length}")
            ]
    return out


@torch.no_grad()
def exact_match(model, noise: KVNoise, examples, key_r: float = 0.0, exact_window: int = 128, batch: int = 8) -> float:
    """Greedy exact match, teacher forced: greedy decoding reproduces the answer iff the argmax
    at every answer position (given the gold prefix) is the gold token, so one forward pass
    suffices. With ``key_r`` > 0, keys outside the exact window get noise of that relative norm."""
    model.eval()
    hits = []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        x = pad_batch([ids for ids, _ in chunk], 0)
        if key_r > 0:
            mask = far_mask([p for _, p in chunk], x.shape[1], exact_window)
            noise.set(mask, torch.full((len(chunk),), key_r), None)
        pred = model(input_ids=x).logits.argmax(-1)
        noise.set()
        for j, (ids, p) in enumerate(chunk):
            hits.append(bool((pred[j, p - 1 : len(ids) - 1] == x[j, p : len(ids)]).all()))
    model.train()
    return float(np.mean(hits))


def lr_at(step: int, args) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    return args.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))


def noise_level(step: int, args) -> float:
    """Maximum relative noise factor in [0, 1]: 0 before ``noise_start``, linear up to 1 at ``noise_full``."""
    frac = step / args.steps
    if frac < args.noise_start:
        return 0.0
    return min(1.0, (frac - args.noise_start) / max(1e-9, args.noise_full - args.noise_start))


def save_checkpoint(path: Path, model, opt, step, rng, history, args) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "args": vars(args),
        },
        tmp,
    )
    os.replace(tmp, path)


def export(model, tokenizer, out_dir: Path, history: list, args) -> None:
    """Write a ``from_pretrained``-loadable model directory (fp32 safetensors) and the curve."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Name the class every transformers >= 5 knows (5.24 writes its internal "TokenizersBackend").
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    curve = {"args": vars(args), "history": history}
    (out_dir.parent / "training_curve.json").write_text(json.dumps(curve, indent=1) + "\n")


EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def check_paths(p: argparse.ArgumentParser, args) -> None:
    """Usage errors, before anything is built or written, for a run directory this invocation
    would damage or cannot use and for an export it could not write."""
    run_dir = Path(args.run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    if args.export_only:
        if not args.export:
            p.error("--export_only needs --export DIR")
        if not checkpoint.is_file():
            p.error(f"argument --export_only: no checkpoint to export, {checkpoint} does not exist")
    elif args.resume:
        if not checkpoint.is_file():
            p.error(f"argument --resume: no checkpoint to resume from, {checkpoint} does not exist; "
                    "leave out --resume to start a new run")
    else:
        held = [name for name in ("checkpoint.pt", "history.json") if (run_dir / name).exists()]
        held += sorted(path.name for path in run_dir.glob("checkpoint_*.pt"))
        if held:
            p.error(f"argument --run_dir: {run_dir} already holds a run ({', '.join(held)}), which a new run "
                    "would replace; pass --resume to continue it, or choose another --run_dir (or delete this "
                    "one) to start afresh")
    if not args.export_only:
        require_output_paths(p, "--run_dir", run_dir, ["checkpoint.pt", "checkpoint.tmp", "history.json", "args.json"])
    if args.export:
        export_dir = Path(args.export)
        require_output_paths(p, "--export", export_dir, EXPORT_FILES)
        require_output_paths(p, "--export", export_dir.parent, ["training_curve.json"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", default="tinylm/runs/main",
                   help="checkpoint, history (git-ignored); a new run refuses one that holds a run (see --resume)")
    p.add_argument("--export", default=None, help="write the final model here (e.g. tinylm/model)")
    p.add_argument("--resume", action="store_true", help="continue from <run_dir>/checkpoint.pt")
    p.add_argument("--export_only", action="store_true", help="export <run_dir>/checkpoint.pt to --export, no training")
    p.add_argument("--layers", type=positive_int, default=3)
    p.add_argument("--hidden", type=positive_int, default=256)
    p.add_argument("--intermediate", type=positive_int, default=512)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--kv_heads", type=positive_int, default=2, help="must divide --heads")
    p.add_argument("--steps", type=positive_int, default=1200)
    p.add_argument("--tokens_per_step", type=positive_int, default=3072)
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument("--warmup", type=positive_int, default=50)
    p.add_argument("--weight_decay", type=non_negative_float, default=0.01)
    p.add_argument("--stages", type=stages_arg, default="0.3:96:192,0.2:160:640,0.2:384:1536,0.3:512:2300",
                   help="fraction:min_len:max_len of prompt tokens per stage, comma-separated; fractions sum to 1")
    p.add_argument("--p_multikey", type=fraction_float, default=0.5, help="share of multikey examples")
    p.add_argument("--key_noise", type=non_negative_float, default=0.8, help="max relative key noise norm")
    p.add_argument("--value_noise", type=non_negative_float, default=0.4, help="max relative value noise norm")
    p.add_argument("--noise_start", type=fraction_float, default=0.35, help="fraction of steps where noise begins")
    p.add_argument("--noise_full", type=fraction_float, default=0.65,
                   help="fraction of steps where noise is at its max")
    p.add_argument("--exact_window", type=non_negative_int, default=128, help="recent prompt tokens kept noise-free")
    p.add_argument("--eval_every", type=positive_int, default=150)
    p.add_argument("--eval_n", type=positive_int, default=8, help="held-out examples per task and length")
    p.add_argument("--eval_noise", type=non_negative_float, default=0.5, help="key noise of the robustness column")
    p.add_argument("--seed", type=numpy_torch_seed_int, default=0)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--max_minutes", type=positive_float, default=None, help="stop (and export) after this wall time")
    p.add_argument("--stop_step", type=positive_int, default=None,
                   help="stop (and export) after this step's checkpoint")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"argument --kv_heads: must divide --heads ({args.heads}), got {args.kv_heads}")
    check_paths(p, args)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tables = synthetic_tasks.load_table("dataset2prompt")
    model = LlamaForCausalLM(model_config(args, tokenizer))
    model.set_attn_implementation("sdpa")
    noise = KVNoise(model)
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    rng = np.random.default_rng(args.seed)
    step, history = 0, []
    checkpoint = run_dir / "checkpoint.pt"
    if args.export_only:
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        export(model, tokenizer, Path(args.export), state["history"], argparse.Namespace(**state["args"]))
        print(f"exported step {state['step']} of {checkpoint} to {args.export}")
        return
    if args.resume:
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}", flush=True)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"params {n_params / 1e6:.2f}M  {json.dumps(vars(args))}", flush=True)
    write_json_atomic(run_dir / "args.json", vars(args), indent=1)
    eval_set = build_eval_set(tokenizer, tables, args.eval_n)
    stages = parse_stages(args.stages)

    def evaluate():
        row = {name: round(exact_match(model, noise, ex), 3) for name, ex in eval_set.items()}
        for task in synthetic_tasks.TASKS:
            name = f"{task}@{EVAL_LENGTHS[-1]}"
            row[f"{name}+noise{args.eval_noise}"] = round(exact_match(model, noise, eval_set[name], args.eval_noise), 3)
        return row

    t0, elapsed0 = time.time(), (history[-1]["time_s"] if history else 0.0)
    tokens, loss_sum, loss_n = (history[-1]["tokens"] if history else 0), 0.0, 0
    model.train()
    while step < args.steps:
        lo, hi = next((lo, hi) for end, lo, hi in stages if step / args.steps < end)
        length = int(rng.integers(lo, hi + 1))
        batch, prompt_lens, extra_targets = [], [], []
        for _ in range(max(1, args.tokens_per_step // length)):
            task = "multikey" if rng.random() < args.p_multikey else "passkey"
            record = synthetic_tasks.make_example(task, rng, length, tables[task])
            ids, prompt_len = encode_example(tokenizer, record, tables[task])
            batch.append(ids)
            prompt_lens.append(prompt_len)
            extra_targets.append(restatement_targets(tokenizer, ids[:prompt_len]))
        x = pad_batch(batch, tokenizer.pad_token_id)
        target_mask = torch.zeros_like(x, dtype=torch.bool)
        for i, (ids, prompt_len, extra) in enumerate(zip(batch, prompt_lens, extra_targets)):
            target_mask[i, prompt_len : len(ids)] = True
            target_mask[i, extra] = True
        level = noise_level(step, args)
        if level > 0:
            n = len(batch)
            noise.set(
                far_mask(prompt_lens, x.shape[1], args.exact_window),
                torch.rand(n) * args.key_noise * level,
                torch.rand(n) * args.value_noise * level,
            )
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        logits = model(input_ids=x).logits
        noise.set()
        shifted = target_mask[:, 1:]
        loss = F.cross_entropy(logits[:, :-1][shifted], x[:, 1:][shifted])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += x.numel()
        loss_sum += loss.item()
        loss_n += 1
        elapsed = elapsed0 + time.time() - t0
        if step % 25 == 0:
            print(
                f"step {step} t={elapsed:.0f}s L={lo}-{hi} loss={loss_sum / loss_n:.4f} lr={lr_at(step, args):.2e} "
                f"noise={level:.2f} tok/s={tokens / max(elapsed, 1):.0f}",
                flush=True,
            )
            loss_sum, loss_n = 0.0, 0
        out_of_time = args.max_minutes is not None and elapsed > 60 * args.max_minutes
        out_of_time |= args.stop_step is not None and step >= args.stop_step
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            row = {"step": step, "time_s": round(elapsed, 1), "tokens": tokens, "noise_level": level, **evaluate()}
            history.append(row)
            print("EVAL " + json.dumps(row), flush=True)
            write_json_atomic(run_dir / "history.json", history, indent=1)
            save_checkpoint(checkpoint, model, opt, step, rng, history, args)
            if step % (4 * args.eval_every) == 0:
                shutil.copy(checkpoint, run_dir / f"checkpoint_{step}.pt")
        if out_of_time:
            print(f"stopping at step {step} (--max_minutes / --stop_step)", flush=True)
            break
    if args.export:
        export(model, tokenizer, Path(args.export), history, args)
        print(f"exported to {args.export}", flush=True)


if __name__ == "__main__":
    main()
