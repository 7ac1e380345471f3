"""Per-phase breakdown of load + first token: ft.load_model vs transformers' from_pretrained.

    PYTHONPATH=src python3 benches/probes/e2e_profile.py DIR [--device cuda] [--repeat 2] [--dtype auto] [--quiet]
        [--loaders flashtensors,transformers]

A loader may carry options after a colon, joined by '+', to compare variants in one run:
    flashtensors:warmup=0        load_model(..., warmup=False) (no GPU warm-up while the weights are read)
    flashtensors:read_path=buffered
    flashtensors:join=1          join the engine's background unpin/munmap before the first-token clock
                                 (its duration is printed as release_wait_s, outside both figures)
    flashtensors:switch=0.0005   sys.setswitchinterval before the clock (GIL hand-off latency)
    flashtensors:prewarm=1       before the clock, time the first-use steps one by one (cuBLAS handle, a bf16
                                 matmul, SDPA, backends.warmup's one-layer generate): what is left after
    flashtensors:light=1         a thread started with the clock runs cuBLAS's and SDPA's first use
    flashtensors:read_path=pinned-mmap   the page cache pinned in place (load_model's default is the ring)
e.g. --loaders flashtensors,flashtensors:warmup=0,transformers

Each (loader, repeat) runs in a fresh process, as `flash bench run --scenarios e2e` does: imports (the model
class and tokenizer classes included), the CUDA context and a warm page cache come before the clock. The
clock covers the same calls as bench/worker.py `_e2e`. Inside, known functions are wrapped with timers (only
those that exist in this tree), so the timeline shows each phase with its thread and nesting. After the
clock, a second generate shows what the first one paid for once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

PROMPT = "The quick brown fox"
MARK = "E2E-PROFILE "

# (module, attribute path, label): wrapped when present.
FT_TARGETS = [
    ("flashtensors.engine.api", "load", "engine.load"),
    ("flashtensors.engine.api", "make_plan", "engine.plan"),
    ("flashtensors.engine.devices", "allocate_arena", "engine.arena"),
    ("flashtensors.engine.pinned_mmap", "read_pinned_mmap", "engine.read_pinned_mmap"),
    ("flashtensors.engine.ring_feeder", "read_through_ring", "engine.read_through_ring"),
    ("flashtensors.engine.readers", "read_into_host", "engine.read_into_host"),
    ("flashtensors.engine.readers", "read_pinned", "engine.read_pinned"),
    ("flashtensors.engine.pinned_mmap", "wait_for_releases", "engine.wait_for_releases"),
    ("flashtensors.engine.devices", "host_unregister", "engine.unpin"),
    ("flashtensors.engine.api", "_place", "engine.place"),
    ("flashtensors.models", "resolve_model_dir", "resolve_model_dir"),
    ("flashtensors.backends.transformers_backend", "load_transformers_model", "backend.load"),
    ("flashtensors.backends.transformers_backend", "_read_config", "config"),
    ("flashtensors.backends.transformers_backend", "_resolve_dtype", "resolve_dtype"),
    ("flashtensors.backends.transformers_backend", "_build_on_meta", "build_on_meta"),
    ("flashtensors.backends.transformers_backend", "_load_tokenizer", "tokenizer"),
    ("flashtensors.backends.transformers_backend", "_target_dtypes", "target_dtypes"),
    ("flashtensors.backends.transformers_backend", "_place", "place"),
    ("flashtensors.backends.transformers_backend", "_load_with_transformers", "transformers_loader"),
    ("flashtensors.backends.transformers_backend", "_read_generation_config", "generation_config"),
    ("flashtensors.backends.transformers_backend", "read_layout", "read_layout"),
    ("flashtensors.backends.transformers_backend", "build_on_meta", "build_on_meta"),
    ("flashtensors.backends.transformers_backend", "prepare", "prepare"),
    ("flashtensors.backends.transformers_backend", "place", "place"),
    ("flashtensors.backends.placement", "_assign", "place.assign"),
    ("flashtensors.backends.transformers_backend", "warm_up", "gpu_warmup"),
    ("flashtensors.engine.sysio", "Mapping.close", "engine.munmap"),
    ("flashtensors.backends.generation", "FlashModel.generate", "generate"),
    ("flashtensors.backends.generation", "FlashModel._encode", "generate.encode"),
    ("flashtensors.backends.generation", "FlashModel._generation_config", "generate.config"),
    ("flashtensors.backends.generation", "FlashModel._run_generate", "generate.run"),
    ("flashtensors.backends.generation", "FlashModel._decode", "generate.decode"),
    ("flashtensors.backends.generation", "FlashModel.tokenizer", "tokenizer.wait"),
]
HF_TARGETS = [
    ("transformers", "AutoModelForCausalLM.from_pretrained", "hf.from_pretrained"),
    ("transformers.modeling_utils", "caching_allocator_warmup", "hf.allocator_warmup"),
    ("transformers.modeling_utils", "PreTrainedModel._load_pretrained_model", "hf.load_pretrained_model"),
    ("transformers", "AutoConfig.from_pretrained", "hf.config"),
    ("transformers", "AutoTokenizer.from_pretrained", "hf.tokenizer"),
    ("transformers", "GenerationConfig.from_pretrained", "hf.generation_config"),
    ("transformers.modeling_utils", "PreTrainedModel.initialize_weights", "hf.initialize_weights"),
    ("transformers.modeling_utils", "PreTrainedModel.tie_weights", "hf.tie_weights"),
    ("torch.nn", "Module.load_state_dict", "torch.load_state_dict"),
    ("transformers.generation.utils", "GenerationMixin.generate", "hf.generate"),
]


class Timeline:
    """Records (label, thread, depth, start, end) for every call of a wrapped function."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, float, float]] = []
        self.t0 = time.perf_counter()
        self.on = False
        self._depth = threading.local()

    def wrap(self, module_name: str, path: str, label: str) -> None:
        import importlib

        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            return
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
            if owner is None:
                return
        if isinstance(owner, type):
            raw = next((k.__dict__[name] for k in owner.__mro__ if name in k.__dict__), None)
        else:
            raw = getattr(owner, name, None)
        if raw is None:
            return
        if isinstance(raw, property):
            setattr(owner, name, property(self._timed(raw.fget, label), raw.fset, raw.fdel))
            return
        kind = type(raw) if isinstance(raw, (classmethod, staticmethod)) else None
        func = raw.__func__ if kind else raw
        if not callable(func):
            return
        timed = self._timed(func, label)
        setattr(owner, name, kind(timed) if kind else timed)

    def _timed(self, func, label):
        def timed(*args, **kwargs):
            if not self.on:
                return func(*args, **kwargs)
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self._depth.n = depth
                end = time.perf_counter()
                self.events.append((label, threading.current_thread().name, depth, start, end))

        timed.__wrapped__ = func
        return timed


def prewarm_steps(directory: str, device: str) -> dict:
    """Time, one by one, the first-use costs a first generate pays (before any clock)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig

    from flashtensors.backends.transformers_backend import auto_class_for
    from flashtensors.backends.warmup import warm_up

    steps = {}

    def step(name, fn):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        steps[name] = round(time.perf_counter() - t, 4)

    x = torch.ones(8, 4096, device=device, dtype=torch.bfloat16)
    w = torch.ones(4096, 4096, device=device, dtype=torch.bfloat16)
    step("blas_handle", lambda: torch.cuda.current_blas_handle())
    step("matmul_bf16", lambda: x @ w)
    step("matmul_bf16_again", lambda: x @ w)
    q = torch.ones(1, 32, 8, 128, device=device, dtype=torch.bfloat16)
    step("sdpa", lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    config = AutoConfig.from_pretrained(directory)
    auto = auto_class_for(config)
    step("warm_up_small_model", lambda: warm_up(auto, config, torch.bfloat16, torch.device(device)))
    step("warm_up_again(no-op)", lambda: warm_up(auto, config, torch.bfloat16, torch.device(device)))
    return steps


def child(spec: str, directory: str, device: str, dtype: str) -> dict:
    loader, _, raw = spec.partition(":")
    opts = dict(kv.split("=", 1) for kv in raw.split("+") if kv)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import flashtensors.backends.transformers_backend  # noqa: F401
    import flashtensors.models
    from flashtensors.bench.cache import warm_cache

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(directory))]
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device=device)
        torch.cuda.synchronize()
    files = [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")]
    warm_cache(files)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    tl = Timeline()
    for target in FT_TARGETS + HF_TARGETS:
        tl.wrap(*target)
    kwargs = {}
    if "warmup" in opts:
        kwargs["warmup"] = {"0": False, "1": True}.get(opts["warmup"])
    if "read_path" in opts:
        kwargs["read_path"] = opts["read_path"]
    if "switch" in opts:
        sys.setswitchinterval(float(opts["switch"]))
    light = None
    if opts.get("light") == "1":  # cuBLAS and SDPA first use on a thread of their own, from the clock's start
        import torch.nn.functional as F
        from transformers import AutoConfig

        hidden = AutoConfig.from_pretrained(directory).hidden_size
        light_times = {}

        def light_run():
            t = time.perf_counter()
            x = torch.ones(8, hidden, device=device, dtype=torch.bfloat16)
            w = torch.ones(hidden, hidden, device=device, dtype=torch.bfloat16)
            torch.cuda.current_blas_handle()
            (x @ w).sum()
            q = torch.ones(1, 32, 8, 128, device=device, dtype=torch.bfloat16)
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum()
            torch.cuda.current_stream().synchronize()
            light_times["seconds"] = time.perf_counter() - t

        light = threading.Thread(target=light_run, name="light-warmup")
    prewarm = None
    if opts.get("prewarm") == "1":  # the first-forward costs paid before the clock: what is left after
        prewarm = prewarm_steps(directory, device)
    release_wait = None
    threads_before = {t.ident for t in threading.enumerate()}
    tl.on = True
    t0 = tl.t0 = time.perf_counter()
    if light is not None:
        light.start()
    if loader == "engine":  # the engine alone on the same files: what load_model adds is the difference
        from flashtensors.engine import api

        result = api.load(directory, device=device, **{k: v for k, v in kwargs.items() if k == "read_path"})
        sync()
        t_load = time.perf_counter()
        tl.on = False
        return {
            "loader": spec,
            "load_s": t_load - t0,
            "first_token_s": 0.0,
            "total_s": t_load - t0,
            "second_generate_s": 0.0,
            "token": -1,
            "logits_sum": float("nan"),
            "engine_seconds": result.stats.seconds,
            "events": [(lb, th, d, s - t0, e - s) for lb, th, d, s, e in tl.events],
        }
    if loader == "transformers":
        model = AutoModelForCausalLM.from_pretrained(directory, device_map=device, dtype=dtype)
        sync()
        t_load = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(directory)
        ids = tok(PROMPT, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=1, do_sample=False)
        sync()
        t1 = time.perf_counter()
        first = out[0, -1].item()
        tl.on = False
        t2 = time.perf_counter()
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=1, do_sample=False)
        sync()
        again = time.perf_counter() - t2
        logits_src = (model, ids["input_ids"])
    else:
        llm = flashtensors.models.load_model(
            model_id=directory, backend="transformers", dtype=dtype, device=device, **kwargs
        )
        sync()
        t_load = time.perf_counter()
        alive = [t.name for t in threading.enumerate() if t.ident not in threads_before]
        if opts.get("join") == "1":
            from flashtensors.engine import pinned_mmap

            pinned_mmap.wait_for_releases()
            release_wait = time.perf_counter() - t_load
            t_load = time.perf_counter()
        outputs = llm.generate([PROMPT], max_tokens=1, temperature=0.0)
        sync()
        t1 = time.perf_counter()
        first = outputs[0].outputs[0].token_ids[0]
        tl.on = False
        t2 = time.perf_counter()
        llm.generate([PROMPT], max_tokens=1, temperature=0.0)
        sync()
        again = time.perf_counter() - t2
        logits_src = (llm.model, torch.tensor([outputs[0].prompt_token_ids], device=device))
    if light is not None:
        light.join()
    with torch.no_grad():
        logits = logits_src[0](logits_src[1]).logits.float()
    result = {
        "loader": spec,
        "release_wait_s": release_wait,
        "prewarm": prewarm,
        "light_s": light_times.get("seconds") if light is not None else None,
        "load_s": t_load - t0,
        "first_token_s": t1 - t_load,
        "total_s": t1 - t0,
        "second_generate_s": again,
        "token": int(first),
        "logits_sum": float(logits.double().sum()),
        "events": [(lb, th, d, s - t0, e - s) for lb, th, d, s, e in tl.events],
    }
    if loader != "transformers":
        result["new_threads_at_load_return"] = alive
        result["engine_seconds"] = llm.load_stats.weights_seconds
        result["warmup_seconds"] = getattr(llm.load_stats, "warmup_seconds", None)
    return result


def show(r: dict, run: int) -> None:
    print(
        f"\n== {r['loader']} run {run}: load {r['load_s']:.3f} s + first token {r['first_token_s']:.3f} s = "
        f"{r['total_s']:.3f} s   (second generate {r['second_generate_s']:.3f} s, token {r['token']}, "
        f"logits sum {r['logits_sum']:.6g})"
    )
    if r["loader"].startswith("engine"):
        print(f"   engine alone: {r['engine_seconds']:.3f} s inside load()")
    if "new_threads_at_load_return" in r:
        print(f"   threads still alive when load_model returned: {r['new_threads_at_load_return'] or 'none'}")
        print(f"   engine {r['engine_seconds']:.3f} s (weights_seconds), warm-up {r['warmup_seconds']}")
    if r.get("prewarm"):
        print(f"   before the clock: {r['prewarm']}")
    if r.get("release_wait_s") is not None:
        print(f"   joined the engine's background release in {r['release_wait_s']:.3f} s (in neither figure)")
    print(f"   {'start':>7} {'seconds':>8}  {'thread':<16} phase")
    merged: dict[tuple[str, str, int], list[float]] = {}
    for label, thread, depth, start, dur in sorted(r["events"], key=lambda e: e[3]):
        if label == "tokenizer.wait" and dur < 1e-3:
            continue  # an attribute read, not a wait
        key = (label, thread, depth)
        if label in ("engine.unpin", "engine.munmap") and key in merged:  # many calls: sum them on one line
            merged[key][1] += dur
            continue
        merged[key] = [start, dur]
        if label not in ("engine.unpin", "engine.munmap"):
            print(f"   {start:7.3f} {dur:8.3f}  {thread[:16]:<16} {'  ' * depth}{label}")
    for (label, thread, depth), (start, dur) in merged.items():
        if label in ("engine.unpin", "engine.munmap"):
            print(f"   {start:7.3f} {dur:8.3f}  {thread[:16]:<16} {'  ' * depth}{label} (all calls)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("directory")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--loaders", default="flashtensors,transformers")
    ap.add_argument("--quiet", action="store_true", help="no per-run timelines, only the summaries")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(MARK + json.dumps(child(args.child, args.directory, args.device, args.dtype)), flush=True)
        return 0
    if args.device.startswith("cuda"):
        # Bring cuBLAS & co. from disk into the page cache once, so that the first run does not pay for it
        # (the bench's first e2e run on a fresh machine does: 2.04 s vs 0.89 s for its first token).
        prime = "; ".join(
            [
                "import torch, torch.nn.functional as F",
                f"x = torch.ones(8, 64, 64, device={args.device!r}, dtype=torch.bfloat16)",
                "(x @ x).sum().item()",
                "F.scaled_dot_product_attention(x[None], x[None], x[None], is_causal=True).sum().item()",
            ]
        )
        subprocess.run([sys.executable, "-c", prime], check=False)
    runs: dict[str, list[dict]] = {}
    for i in range(args.repeat):
        for loader in args.loaders.split(","):
            cmd = [sys.executable, __file__, args.directory, "--device", args.device, "--dtype", args.dtype]
            proc = subprocess.run([*cmd, "--child", loader], capture_output=True, text=True, env=os.environ)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
            if line is None:
                print(f"{loader} run {i + 1} failed:\n{proc.stderr[-3000:]}")
                return 1
            r = json.loads(line[len(MARK) :])
            runs.setdefault(loader, []).append(r)
            if not args.quiet:
                show(r, i + 1)
            else:
                print(
                    f"run {i + 1} {loader:<40} load {r['load_s']:.3f} first {r['first_token_s']:.3f} "
                    f"total {r['total_s']:.3f} engine {r.get('engine_seconds') or 0:.3f} "
                    f"light {r.get('light_s')} prewarm {r.get('prewarm')}",
                    flush=True,
                )
    print("\n== medians (s)")
    print(f"   {'loader':<30} {'load':>7} {'first':>7} {'total':>7} {'2nd gen':>8} {'engine':>7}")
    for loader, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("load_s", "first_token_s", "total_s")}
        gen2 = statistics.median(r["second_generate_s"] for r in rs)
        eng = statistics.median(r.get("engine_seconds") or 0.0 for r in rs)
        print(
            f"   {loader:<30} {med['load_s']:7.3f} {med['first_token_s']:7.3f} {med['total_s']:7.3f} "
            f"{gen2:8.3f} {eng:7.3f}"
        )
    print("\n== per phase, median over runs of the summed seconds (thread in brackets)")
    for loader, rs in runs.items():
        per_run = []
        for r in rs:
            acc: dict[str, float] = {}
            for label, thread, _depth, _start, dur in r["events"]:
                key = f"{label} [{'main' if thread == 'MainThread' else thread.rstrip('_0123456789')}]"
                acc[key] = acc.get(key, 0.0) + dur
            per_run.append(acc)
        keys = list(dict.fromkeys(k for acc in per_run for k in acc))
        print(f"   {loader}")
        for k in keys:
            print(f"     {statistics.median(acc.get(k, 0.0) for acc in per_run):7.3f}  {k}")
    sums = {loader: {r["logits_sum"] for r in rs} for loader, rs in runs.items() if loader != "engine"}
    print(f"   logits sums: {sums}  (equal across loaders when the models are the same)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
