"""Hessian probe speed on a GPU (issue 14, items 1 and 2): what one Hutchinson probe costs against one forward +
backward, on the paths bitplan has, for a GPT-2-small-shaped and a ~1 B-parameter Llama-shaped model with random
weights and SDPA attention; then a whole ``bitplan plan`` on the Llama-shaped one.

    python bench/gpu/probe_speed.py                 # on a GPU machine (device auto = cuda)
    python bench/gpu/probe_speed.py --small         # tiny shapes: checks the script on a CPU in a minute

Each model is built by transformers (``attn_implementation="sdpa"``), written with ``save_pretrained`` and read back
by bitplan's own loader, exactly as ``bitplan plan CHECKPOINT_DIR`` reads it (torch.export graph, then moved to the
device by ``LoadedModel.to``). On one batch (8 x 256 tokens by default) of random token ids, KL loss to the model's
own full-precision output (what ``auto`` and ``hessian_trace loss=kl`` differentiate), it times, with the quantizable
layers' weights as the variables:

* ``fwd+bwd``: one forward and one backward (the unit of the target "a probe <= 1.5 x fwd+bwd");
* ``probe, exact, fused SDPA``: one exact Hessian-vector product (double backward) with the fused attention kernels
  (expected to fail: they have no double backward; the table says how);
* ``probe, exact, SDPA math``: the same with SDPA swapped for its math form (bitplan's fallback today);
* ``probe, finite differences, fused``: two gradients at w +- e.v on the fused kernels (``hvp=finite_difference``);
* ``probes, forward differences, fused``: one gradient at w + e.v per probe plus one at w per pass, on the fused
  kernels (``hvp=forward_difference``, what ``auto`` uses on a GPU for a model with SDPA): the candidate for the
  target;
* ``N probes, ...``: N probes in passes of ``--per-pass`` (several probes share one double-backward graph).

Then ``bitplan plan DIR --data ids.npz --device DEVICE`` on the Llama-shaped checkpoint, in a child process, guarded:
the timing table is printed whatever happens to the plan. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FULL = {
    "gpt2-small": {"kind": "gpt2", "layers": 12, "hidden": 768, "heads": 12, "vocab": 50257, "positions": 1024},
    # TinyLlama-1.1B's shape: 22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads (grouped-query attention)
    "llama-1b": {"kind": "llama", "layers": 22, "hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4,
                 "vocab": 32000, "positions": 2048},
}
SMALL = {
    "gpt2-small": {"kind": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "vocab": 256, "positions": 64},
    "llama-1b": {"kind": "llama", "layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2,
                 "vocab": 256, "positions": 64},
}


def build(spec: dict, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    if spec["kind"] == "gpt2":
        config = GPT2Config(n_layer=spec["layers"], n_embd=spec["hidden"], n_head=spec["heads"], vocab_size=spec["vocab"],
                            n_positions=spec["positions"], bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    else:
        config = LlamaConfig(hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                             intermediate_size=spec["intermediate"], num_attention_heads=spec["heads"],
                             num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"],
                             max_position_embeddings=spec["positions"], tie_word_embeddings=False,
                             bos_token_id=None, eos_token_id=None, pad_token_id=None)
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    return model.eval()


def load_as_bitplan(model, folder: Path, ids: torch.Tensor):
    """The checkpoint read by bitplan's Hugging Face loader (what ``bitplan plan DIR`` does); where that loader is
    missing or fails, the model exported to a .pt2 and read back. Returns (LoadedModel, how)."""
    from bitplan.core.loading import load_model

    model.save_pretrained(str(folder), safe_serialization=True)
    try:
        return load_model(str(folder)), "bitplan's checkpoint loader"
    except Exception as exc:  # the loader is new: fall back to a .pt2, and say so
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        traceback.print_exc()  # the whole reason, on stderr: the table has room for its first line only

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    program = torch.export.export(Logits().eval(), (), {"input_ids": ids[:2]},
                                  dynamic_shapes={"input_ids": {0: torch.export.Dim("batch")}}, strict=False)
    path = folder.parent / f"{folder.name}.pt2"
    torch.export.save(program, str(path))
    return load_model(str(path)), f"a .pt2 export (checkpoint loader failed: {why})"


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn, repeat: int, warmup: int = 1) -> tuple[float, float | None]:
        """(median seconds, peak GiB allocated during the timed runs or None on the CPU)."""
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None
        return statistics.median(times), peak


def bench_model(name: str, spec: dict, args, device: torch.device, dtype: torch.dtype, work: Path) -> tuple[list, Path]:
    from bitplan.core.data import Dataset
    from bitplan.core.graph import replace_sdpa_with_math, restore_sdpa
    from bitplan.core.quant import WeightBank
    from bitplan.core.sensitivity import SensitivityContext
    from bitplan.core.sensitivity.common import reference_logp, weights_of
    from bitplan.core.sensitivity.hessian_trace import rademacher
    from bitplan.core.sensitivity.hvp import HessianOracle, NoDoubleBackward

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab"], (args.batch, args.tokens), generator=gen)
    hf = build(spec)
    params = sum(p.numel() for p in hf.parameters())
    started = time.perf_counter()
    model, how = load_as_bitplan(hf, work / name, ids)
    del hf
    load_s = time.perf_counter() - started
    model.to(device, dtype)
    data = Dataset({"input_ids": ids}, None, "random token ids", "0" * 64).to(device)
    weights = {g.weight_key: model.weight(g) for g in model.layers}
    ctx = SensitivityContext(model, data, [4], WeightBank(weights), 0)
    weights = weights_of(ctx)
    batches = [data.slice(0, args.batch)]
    refs = reference_logp(ctx, batches)
    batch, ref = batches[0], refs[0]
    clock = Clock(device)
    tokens = args.batch * args.tokens
    rows: list[dict] = []
    head = {"model": name, "params": f"{params / 1e6:,.3g} M", "batch": f"{args.batch}x{args.tokens}"}

    def row(step: str, seconds: float | None, peak: float | None, note: str = "", per: float | None = None) -> None:
        rows.append(head | {"step": step, "seconds": seconds, "per_probe": per, "peak": peak, "note": note})

    def probes(n: int) -> list[dict]:
        out = []
        for i in range(n):
            g = torch.Generator().manual_seed(1000 + i)
            out.append({k: rademacher(w, g) for k, w in weights.items()})
        return out

    one = probes(1)
    with HessianOracle(ctx, batches, refs, weights, "auto") as oracle:
        base, peak = clock.time(lambda: oracle._grad(batch, ref, weights), args.repeat)
        row("fwd+bwd", base, peak, f"{tokens / base:,.0f} tokens/s; loaded by {how} in {load_s:.1f} s")
        try:
            s, peak = clock.time(lambda: oracle._exact(batch, ref, one, block=False), args.repeat)
            row("probe, exact, fused SDPA", s, peak, "double backward through the fused kernels worked")
        except NoDoubleBackward as exc:
            row("probe, exact, fused SDPA", None, None, f"fails: {str(exc)[:110]}")
        except torch.OutOfMemoryError:
            row("probe, exact, fused SDPA", None, None, "out of GPU memory")
        swapped = replace_sdpa_with_math(model.gm)
        try:
            s, peak = clock.time(lambda: oracle._exact(batch, ref, one, block=False), args.repeat)
            row("probe, exact, SDPA math", s, peak, f"{swapped} attention node(s) in math form")
            group = probes(args.per_pass)
            s, peak = clock.time(lambda: oracle._exact(batch, ref, group, block=False), args.repeat)
            row(f"{args.per_pass} probes in one pass, exact, SDPA math", s, peak,
                "vmapped double backward" if oracle.batched else "one double backward per probe", per=s / args.per_pass)
            passes = [probes(args.per_pass) for _ in range(max(1, args.probes // args.per_pass))]
            s, peak = clock.time(lambda: [oracle._exact(batch, ref, p, block=False) for p in passes], 1, warmup=0)
            n = len(passes) * args.per_pass
            row(f"{n} probes, exact, SDPA math", s, peak, f"passes of {args.per_pass}", per=s / n)
        except torch.OutOfMemoryError:
            row("probe, exact, SDPA math", None, None, "out of GPU memory")
        finally:
            restore_sdpa(model.gm)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        try:
            s, peak = clock.time(lambda: oracle._fd(batch, ref, one, block=False), args.repeat)
            row("probe, finite differences, fused", s, peak, "2 gradients at w +- e.v, float32")
            n = max(1, args.probes)
            group = probes(n)
            s, peak = clock.time(lambda: oracle._fd(batch, ref, group, block=False), 1, warmup=0)
            row(f"{n} probes, finite differences, fused", s, peak, "2 gradients per probe", per=s / n)
        except torch.OutOfMemoryError:
            row("probe, finite differences, fused", None, None, "out of GPU memory")
        try:
            n = max(1, args.per_pass)
            group = probes(n)
            s, peak = clock.time(lambda: oracle._forward(batch, ref, group, block=False), args.repeat)
            row(f"{n} probes in one pass, forward differences, fused", s, peak,
                f"{n} + 1 gradients (hvp=forward_difference; auto on a GPU)", per=s / n)
            n = max(1, args.probes)
            passes = [probes(args.per_pass) for _ in range(max(1, n // args.per_pass))]
            s, peak = clock.time(lambda: [oracle._forward(batch, ref, p, block=False) for p in passes], 1, warmup=0)
            n = len(passes) * args.per_pass
            row(f"{n} probes, forward differences, fused", s, peak, f"passes of {args.per_pass}", per=s / n)
        except torch.OutOfMemoryError:
            row("probes, forward differences, fused", None, None, "out of GPU memory")
    for r in rows:
        r["ratio"] = None if (r["per_probe"] or r["seconds"]) is None else (r["per_probe"] or r["seconds"]) / base
    return rows, work / name  # (the model and its graphs go with this frame; main empties the CUDA cache)


def run_plan(folder: Path, spec: dict, args, device: str, work: Path) -> dict:
    """``bitplan plan`` on the checkpoint in a child process (the CLI a user runs), never raising."""
    gen = np.random.default_rng(1)
    data = work / "plan_ids.npz"
    np.savez(data, **{"inputs.input_ids": gen.integers(0, spec["vocab"], (args.plan_samples, args.tokens), dtype=np.int64)})
    out = work / "plan.json"
    cmd = [sys.executable, "-m", "bitplan.cli", "plan", str(folder), "--data", str(data), "--device", device,
           "--dtype", args.dtype, "--budget", "avg_weight_bits=4.5", "--refine-seconds", str(args.refine_seconds),
           "--out", str(out), *args.plan_arg]
    env = dict(os.environ, BITPLAN_MAX_UNPACKED_MB=str(max(int(os.environ.get("BITPLAN_MAX_UNPACKED_MB", 0) or 0), 100_000)),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    started = time.perf_counter()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.plan_timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": time.perf_counter() - started, "detail": f"timed out after {args.plan_timeout} s",
                "cmd": cmd}
    seconds = time.perf_counter() - started
    lines = run.stdout.strip().splitlines()
    stages = next((x.removeprefix("time per stage: ") for x in lines if x.startswith("time per stage:")), "")
    notes = [x.strip().removeprefix("note: ") for x in lines if x.strip().startswith("note: ")]
    detail = stages if run.returncode == 0 else (run.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
    return {"ok": run.returncode == 0, "rc": run.returncode, "seconds": seconds, "detail": detail, "notes": notes,
            "cmd": cmd}


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes, 2x16 tokens, 8 probes: checks the script anywhere")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the timings and the plan (finite differences always run in float32)")
    p.add_argument("--models", default="gpt2-small,llama-1b")
    p.add_argument("--batch", type=int)
    p.add_argument("--tokens", type=int)
    p.add_argument("--probes", type=int, help="probes of the 'N probes' rows (default 100; --small 8)")
    p.add_argument("--per-pass", type=int, default=4, help="probes sharing one double-backward graph (hessian_trace's "
                                                           "probes_per_pass)")
    p.add_argument("--repeat", type=int, help="timed repeats per single step, median reported (default 3; --small 1)")
    p.add_argument("--skip-plan", action="store_true")
    p.add_argument("--plan-samples", type=int, default=64, help="token sequences in the plan's calibration data")
    p.add_argument("--refine-seconds", type=float, default=30.0)
    p.add_argument("--plan-timeout", type=float, default=3600.0)
    p.add_argument("--plan-arg", action="append", default=[], help="extra argument for bitplan plan (repeatable), "
                   "e.g. --plan-arg=--sensitivity --plan-arg=hessian_trace")
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.small else 8)
    args.tokens = args.tokens or (16 if args.small else 256)
    args.probes = args.probes if args.probes is not None else (8 if args.small else 100)
    args.repeat = args.repeat or (1 if args.small else 3)
    from bitplan.core.device import resolve

    placement = resolve(args.device, args.dtype)
    device = placement.device
    shapes = SMALL if args.small else FULL
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# Hessian probe speed: {what}, torch {torch.__version__}, dtype {args.dtype}"
          + (", small shapes (--small)" if args.small else ""))
    if device.type == "cuda":
        print(f"SDPA backends enabled: flash {torch.backends.cuda.flash_sdp_enabled()}, memory-efficient "
              f"{torch.backends.cuda.mem_efficient_sdp_enabled()}, math {torch.backends.cuda.math_sdp_enabled()}")
    rows: list[dict] = []
    folders: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="bitplan-gpu-bench-") as tmp:
        work = Path(tmp)
        for name in names:
            try:
                got, folder = bench_model(name, shapes[name], args, device, placement.dtype, work)
                rows += got
                folders[name] = folder
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                rows.append({"model": name, "params": "?", "batch": f"{args.batch}x{args.tokens}", "step": "(all)",
                             "seconds": None, "per_probe": None, "ratio": None, "peak": None,
                             "note": f"failed: {type(exc).__name__}: {str(exc)[:150]}"})
        print()
        print("| model | params | batch | step | seconds | s/probe | x fwd+bwd | peak GiB | note |")
        print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
        for r in rows:
            print(f"| {r['model']} | {r['params']} | {r['batch']} | {r['step']} | {fmt(r['seconds'])} | "
                  f"{fmt(r['per_probe'])} | {fmt(r['ratio'])} | {fmt(r['peak'])} | {r['note']} |")
        print("\nx fwd+bwd: seconds per probe over one forward + backward on the same batch (the target is <= 1.5).")
        plan_model = "llama-1b"
        if not args.skip_plan:
            print(f"\n## bitplan plan on {plan_model}\n")
            if plan_model not in folders:
                print(f"(skipped: {plan_model} was not built)")
            else:
                result = run_plan(folders[plan_model], shapes[plan_model], args, str(device), work)
                print("| model | device | dtype | ok | seconds | time per stage (or the error) |")
                print("| --- | --- | --- | --- | ---: | --- |")
                ok = "yes" if result["ok"] else f"no (rc {result.get('rc')})"
                print(f"| {plan_model} | {device} | {args.dtype} | {ok} | {result['seconds']:.1f} | {result['detail']} |")
                for note in result.get("notes", []):
                    print(f"- {note}")
                print("\n`" + " ".join(str(c) for c in result["cmd"][2:]) + "`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
