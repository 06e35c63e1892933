"""Side by side with trl's AlignProp on the peer harness (`../shared/anchors`): step time and latent-64 memory, as ratios.

    python benchmarks/side_by_side.py                                         # ours; the peer from --peer-json if given
    python benchmarks/side_by_side.py --peer-python $ANCHORS_VENV/bin/python  # the peer too, back to back (~15 min)

The harness's settings on both sides (its README): its tiny SD (`tiny_sd.py`, seed 0: latent 16 for time, 64 for
memory), 20 DDIM steps, eta 1, CFG 5, 2 images a step, "a photo of a cat", LoRA r 4 / alpha 4 on to_q/k/v/out.0, fp32,
mean brightness, AdamW lr 1e-3 (weight decay 1e-4), clip 1, one torch thread, one fresh process per row. Ours runs
`train.py --config configs/base.yaml` with those overrides (printed per row); everything else is our default, so the
rows show what a user gets: `objective.kl_log_steps` (2 base calls before the window for the logged KL),
`objective.checkpointing=null` (auto: off at latent 16, on at latent 64) and `objective.paired_calls=null` (auto: policy
and base in one call at latent 16, apart at latent 64). Step time: the median of steps 3..10 (ours:
history.json's `step_time`; the peer: its harness's clean steps after 2 warm-ups). Step-extra memory: peak RSS −
RSS before the first step, one optimizer step in a fresh process (ours: history.json's `peak_mem_mb` −
`setup_mem_mb`). Each process waits for a quiet CPU first; "other %" is the CPU share other processes took while it
ran (one thread on 2 cores: clean below 55 %).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = dict(guidance=5, batch=2, lr=1e-3, lora_alpha=4, weight_decay=1e-4)
COMMON = ["sampler.steps=20", "sampler.eta=1.0", f"sampler.guidance_scale={HARNESS['guidance']}",
          "control.rank=4", f"control.lora_alpha={HARNESS['lora_alpha']}", "control.target_modules=[to_q,to_k,to_v,to_out.0]",
          f"optim.lr={HARNESS['lr']}", f"optim.weight_decay={HARNESS['weight_decay']}", f"optim.batch_size={HARNESS['batch']}",
          "optim.max_grad_norm=1.0", "reward.name=brightness", "prompts.list=[a photo of a cat]", "logging.tracker=none",
          "logging.eval_every=0", "logging.summary_samples=0", "output.checkpoint_every=0"]


def window(k: int) -> list[str]:
    return [f"objective.window_min={k}", f"objective.window_max={k}"]


# name: (K it compares with, overrides). Without a checkpointing override the row runs our default (auto).
OURS = {
    "ours_k5": (5, window(5)),
    "ours_k5_ckpt": (5, [*window(5), "objective.checkpointing=true"]),
    "ours_k5_exact_log": (5, [*window(5), "objective.kl_log_steps=null"]),
    "ours_k20": (20, window(20)),
    "ours_k20_ckpt": (20, [*window(20), "objective.checkpointing=true"]),
    "adjoint_k5": (5, ["objective.estimator=adjoint", "objective.adjoint_steps=5"]),
    "adjoint_k20": (20, ["objective.estimator=adjoint", "objective.adjoint_steps=20"]),
}
TIMED = ["ours_k5", "ours_k5_ckpt", "ours_k5_exact_log", "ours_k20", "ours_k20_ckpt", "adjoint_k5", "adjoint_k20"]
MEMORY = ["ours_k5", "ours_k20", "adjoint_k5", "adjoint_k20"]  # at latent 64 the default (auto) checkpoints
PEER = {"alignprop_k5": 5, "alignprop_k20": 20}
# the peer again with the malloc setting our trainer makes for itself (a fixed 1 MiB mmap threshold), memory only:
# how much of the memory ratio is that setting, which any trainer could make, and how much is the engine
PEER_MALLOC = {"alignprop_k5_malloc1m": 5, "alignprop_k20_malloc1m": 20}


class OthersMeter:
    """Share of the machine's CPU that processes other than this one and its children took meanwhile."""

    @staticmethod
    def _snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for a in ("ru_utime", "ru_stime"))
        return sum(v), v[3] + v[4], own * os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self.start = self._snap()
        return self

    def __exit__(self, *exc):
        total, idle, own = (b - a for a, b in zip(self.start, self._snap()))
        self.others = max(0.0, (total - idle - own) / max(total, 1))


def wait_quiet(max_wait: float) -> None:
    t0 = time.time()
    while time.time() - t0 < max_wait:
        with OthersMeter() as m:
            time.sleep(2)
        if m.others < 0.10:
            return
    print(f"  (the CPU stayed busy for {max_wait:.0f} s; measuring anyway)", flush=True)


def run_ours(name: str, model_dir: str, steps: int, log_dir: str, max_wait: float) -> dict:
    k, overrides = OURS[name]
    out = tempfile.mkdtemp(prefix=f"sbs-{name}-")
    args = [*COMMON, *overrides, f"model.pretrained={model_dir}", f"optim.steps={steps}", f"output.dir={out}"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "base.yaml"), *args]
    env = {**os.environ, "SB_FINETUNE_CPU_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    wait_quiet(max_wait)
    with OthersMeter() as m:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    with open(os.path.join(log_dir, f"{name}_{steps}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n" + r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"{name} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    with open(os.path.join(out, "config.yaml")) as f:
        checkpointing = next(ln.split(":", 1)[1].strip() for ln in f if ln.strip().startswith("checkpointing:"))
    times = [h["step_time"] for h in history]
    return {"config": name, "k": k, "step_s": statistics.median(times[2:]) if len(times) > 2 else times[-1],
            "first_step_s": times[0], "extra_mb": history[-1]["peak_mem_mb"] - history[-1]["setup_mem_mb"],
            "peak_mb": history[-1]["peak_mem_mb"], "others": m.others, "checkpointing": checkpointing,
            "kl_steps": history[-1].get("kl_steps"), "overrides": overrides}


def run_peer(python: str, anchors: str, name: str, model_dir: str, steps: int, warmup: int, log_dir: str,
             max_wait: float) -> dict:
    config, malloc = name.removesuffix("_malloc1m"), name.endswith("_malloc1m")
    cmd = [python, os.path.join(anchors, "bench_trl.py"), "worker", config, "--model-dir", model_dir,
           "--steps", str(steps), "--warmup", str(warmup), "--threads", "1"]
    wait_quiet(max_wait)
    with OthersMeter() as m:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"MALLOC_MMAP_THRESHOLD_": str(1 << 20)} if malloc else {})}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with open(os.path.join(log_dir, f"{name}_{steps}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n" + r.stdout + r.stderr)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"peer {config} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    return {"config": name, "k": PEER[config], "step_s": res["step_s"], "first_step_s": res["step_times"][0],
            "extra_mb": res["peak_rss_mb"] - res["setup_rss_mb"], "peak_mb": res["peak_rss_mb"], "others": m.others}


def table(timing: dict, memory: dict) -> str:
    """The rows as ratios to AlignProp at the same K (timing at latent 16, step-extra memory at latent 64)."""
    peer = {r["k"]: r for r in timing.values() if r["config"] in PEER}
    peer_mem = {r["k"]: r for r in memory.values() if r["config"] in PEER}
    out = ["| config | checkpointing | s/step (latent 16) | ours / AlignProp | round by round | step-extra MB (latent 64) "
           "| ours / AlignProp | other % (time / memory) |", "|---|---|---|---|---|---|---|---|"]
    for name in [*PEER, *PEER_MALLOC, *OURS]:
        t, m = timing.get(name), memory.get(name)
        if not t and not m:
            continue
        k = (t or m)["k"]
        ckpt = "always" if name in PEER or name in PEER_MALLOC else " / ".join(r["checkpointing"] if r else "—" for r in (t, m))
        cells = [name, ckpt]
        for row, ref, key, fmt in ((t, peer.get(k), "step_s", ".3f"), (m, peer_mem.get(k), "extra_mb", ".0f")):
            cells.append(format(row[key], fmt) if row else "—")
            cells.append(f"{row[key] / ref[key]:.2f}" if row and ref and name in OURS else "—")
            if key == "step_s":  # each round's ratio to the peer's run of the same round: the host's drift cancels
                pairs = list(zip(t.get("rounds", []), ref.get("rounds", []))) if t and ref and name in OURS else []
                cells.append(", ".join(f"{a / b:.2f}" for a, b in pairs) or "—")
        cells.append(" / ".join(f"{100 * r['others']:.0f}" if r else "—" for r in (t, m)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", default=os.path.join(ROOT, "..", "shared", "anchors"), help="the harness's folder")
    ap.add_argument("--peer-python", help="the harness venv's python ($ANCHORS_VENV/bin/python): run the peer too")
    ap.add_argument("--peer-json", help="instead, the peer's rows from an earlier run of this script (--json)")
    ap.add_argument("--rows", nargs="+", default=None, help=f"our rows (default all: {', '.join(OURS)})")
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds, peer and ours alternating; each row keeps its "
                    "fastest (noise only adds time), and the table shows each round's ratio too")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per timed run (median of 3..steps)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--max-wait", type=float, default=60, help="seconds to wait for a quiet CPU before each process")
    ap.add_argument("--json", default=None, help="write every row here")
    a = ap.parse_args()
    anchors = os.path.abspath(a.anchors)
    sys.path.insert(0, anchors)
    from bench_trl import ensure_model  # stdlib-only at import; builds the harness's tiny SD with its own recipe

    log_dir = tempfile.mkdtemp(prefix="sbs-logs-")
    rows = a.rows or list(OURS)
    models = {}
    for size in (16, 64):
        models[size], _, fp = ensure_model(size)
        print(f"model latent {size}: {models[size]} (fingerprint {fp})", flush=True)
    timing, memory = {}, {}
    if a.peer_json:
        with open(a.peer_json) as f:
            saved = json.load(f)
        timing.update({k: v for k, v in saved["timing"].items() if k in PEER})
        memory.update({k: v for k, v in saved["memory"].items() if k in PEER or k in PEER_MALLOC})
    started = time.time()
    rounds: dict[str, list[dict]] = {}
    for _ in range(a.rounds):  # alternating, so that both sides see the same host, round by round
        for config in PEER if a.peer_python else ():
            rounds.setdefault(config, []).append(run_peer(a.peer_python, anchors, config, models[16], 6, 2, log_dir,
                                                          a.max_wait))
            print(f"  {config}: {rounds[config][-1]['step_s']:.3f} s/step", flush=True)
        for name in [r for r in TIMED if r in rows]:
            rounds.setdefault(name, []).append(run_ours(name, models[16], a.steps, log_dir, a.max_wait))
            print(f"  {name}: {rounds[name][-1]['step_s']:.3f} s/step (checkpointing "
                  f"{rounds[name][-1]['checkpointing']})", flush=True)
    for name, runs in rounds.items():
        timing[name] = {**min(runs, key=lambda r: r["step_s"]), "rounds": [r["step_s"] for r in runs]}
    if not a.skip_memory:
        if a.peer_python:
            for config in [*PEER, *PEER_MALLOC]:
                memory[config] = run_peer(a.peer_python, anchors, config, models[64], 1, 0, log_dir, a.max_wait)
                print(f"  {config} latent 64: {memory[config]['extra_mb']:.0f} MB step extra", flush=True)
        for name in [r for r in MEMORY if r in rows]:
            memory[name] = run_ours(name, models[64], 1, log_dir, a.max_wait)
            print(f"  {name} latent 64: {memory[name]['extra_mb']:.0f} MB step extra "
                  f"(checkpointing {memory[name]['checkpointing']})", flush=True)
    print(f"\n{table(timing, memory)}\n\n{(time.time() - started) / 60:.1f} min; logs in {log_dir}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"timing": timing, "memory": memory, "common": COMMON}, f, indent=1)


if __name__ == "__main__":
    main()
