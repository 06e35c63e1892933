import os

# CI draws its host, and another CPU's kernels sum in another order: an equality between two computations of one
# quantity is checked at float rounding's own scale, not elementwise at 1e-6. Before trusting a tight tolerance, run
# the suite as other hosts would (on 2026-12-05 the first found three such tests, the second none):
#   ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 pytest          (an AVX2 host's kernels)
#   ONEDNN_MAX_CPU_ISA=AVX512_CORE pytest -n 0                       (no AMX; one process, all cores' threads)

# Tests never touch the network: the hub is offline, and nothing may silently download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The suite runs in pytest-xdist workers (`-n` in pyproject's addopts): each worker, and each process a test launches,
# takes its share of the physical cores in threads, as `train.py` gives each of its processes; more threads than cores
# spin against each other.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    import psutil

    _share = str(max(1, (psutil.cpu_count(logical=False) or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _share)
    os.environ.setdefault("SB_FINETUNE_CPU_THREADS", _share)

import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Every two-process run of the suite, on the smoke config: launched together once a session (`two_ranks`), so that one
# `accelerate launch` pays the two processes' start and imports (~10 s) for all of them. "{jpeg}" is the address of a
# jpeg_compressibility reward server the fixture serves for the session.
TWO_RANK_RUNS = {
    "kl_grad=window": ("optim.steps=4", "optim.lr=1e-2", "objective.kl_grad=window"),
    "kl_grad=all": ("optim.steps=4", "optim.lr=1e-2", "objective.kl_grad=all"),
    "stl": ("optim.steps=4", "optim.lr=1e-2", "objective.path_gradient=stl", "objective.checkpointing=true"),
    "checkpointing": ("optim.steps=4", "optim.lr=1e-2", "objective.checkpointing=true"),
    "checkpointing_apart": ("optim.steps=4", "optim.lr=1e-2", "objective.checkpointing=true",
                            "objective.paired_calls=false"),
    "adjoint": ("optim.steps=4", "optim.lr=1e-2", "objective.estimator=adjoint", "objective.adjoint_steps=3"),
    "base_pool": ("optim.steps=4", "optim.lr=1e-2", "objective.estimator=base_pool", "objective.pool_size=4",
                  "objective.grad_steps=2", "prompts.list=[a cat]", "output.checkpoint_every=4"),
    "base_pool_contrast": ("optim.steps=4", "optim.lr=1e-2", "objective.estimator=base_pool", "objective.pool_size=4",
                           "objective.grad_steps=2", "prompts.list=[a cat]", "output.checkpoint_every=4",
                           "objective.pool_target=contrast"),
    "nan_on_rank1": ("optim.steps=3", "reward.name=nan_on_rank1_second_call"),
    "flux": ("model.pretrained=tiny:flux", "sampler.steps=4", "sampler.guidance_scale=3.5", "optim.steps=2",
             "optim.lr=1e-2"),
    **{f"jpeg_{name}": ("optim.steps=3", "optim.lr=1e-2", "optim.batch_size=4", "optim.group_size=2",
                        "objective.grad_steps=2", "reward.name={jpeg}", "optim.updates_per_batch=2", *extra)
       for name, extra in (("weighted", ("objective.estimator=weighted",)),
                           ("policy_gradient", ("objective.estimator=policy_gradient", "objective.clip_ratio=0.2")))},
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_ranks(runs: dict[Path, tuple[str, ...]]) -> None:
    """tests/two_rank_worker.py on the smoke config as a real 2-process DDP run (gloo) through `accelerate launch`, as a
    user starts one: the runs (folder → overrides) one after another in the same two processes. Fails only if the
    launch itself does (a hang, a crash); a run's own error is its folder's, for `check_two_rank_run`."""
    first = next(iter(runs))
    spec = first.parent / f"{first.name}_runs.json"
    spec.write_text(json.dumps([{"dir": str(d), "overrides": ["logging.eval_every=0", *o]} for d, o in runs.items()]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "tests" / "two_rank_worker.py"), str(ROOT / "configs" / "smoke.yaml"), str(spec)]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    limit = 120 + 60 * len(runs)  # about 10 s to start, 5-8 s a run when well
    try:
        _, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        _, stderr = proc.communicate()
        pytest.fail(f"the two processes hung (killed after {limit} s): {stderr[-1500:]}")
    workers = stderr.split('Traceback (most recent call last):\n  File "<frozen runpy>"')[0]  # before the launcher's own
    assert proc.returncode == 0, "\n".join(line for line in workers.splitlines() if "Warning" not in line)[-4000:]


def check_two_rank_run(out_dir: Path) -> Path:
    """The run in `out_dir` ended on both ranks of a two-process launch, without an error."""
    for error in sorted(out_dir.glob("error_rank*.txt")):
        pytest.fail(f"{error.name}:\n{error.read_text()[-3000:]}")
    assert sorted(p.name for p in out_dir.glob("rank*.json")) == ["rank0_of_2.json", "rank1_of_2.json"]  # really two
    return out_dir


def _serve_jpeg_and_launch(root: Path) -> None:
    """Every TWO_RANK_RUNS run into `root`, with a jpeg_compressibility reward server up while they train."""
    from sb_finetune.rewards import load_reward
    from sb_finetune.rewards.server import make_server

    srv = make_server(load_reward("jpeg_compressibility"), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    jpeg = f"http://127.0.0.1:{srv.server_address[1]}/score"
    root.mkdir()
    try:
        launch_two_ranks({root / name: tuple(o.replace("{jpeg}", jpeg) for o in overrides)
                          for name, overrides in TWO_RANK_RUNS.items()})
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """name → the folder of that TWO_RANK_RUNS run, checked. Launched once a test session, by the first test that
    asks: pytest-xdist's workers share the session's base folder, and the first to take its lock launches while the
    others wait for it."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's, above each worker's own
    root, done, failed = shared / "two_ranks", shared / "two_ranks.done", shared / "two_ranks.failed"
    with FileLock(str(shared / "two_ranks.lock")):
        if not done.exists() and not failed.exists():
            try:
                _serve_jpeg_and_launch(root)
            except BaseException as exc:  # pytest.fail raises a BaseException
                failed.write_text(str(exc))
                raise
            done.touch()
    if failed.exists():
        pytest.fail(f"the two-process launch failed in another worker: {failed.read_text()}")
    return lambda name: check_two_rank_run(root / name)
